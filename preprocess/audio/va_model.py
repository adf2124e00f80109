"""audEERING's dimensional speech-emotion model (``audeering/wav2vec2-large-robust-12-ft-emotion-msp-dim``).

The checkpoint is a Wav2Vec2 backbone (wav2vec2-large-robust, pruned to 12 layers, fine-tuned on MSP-Podcast)
with a small regression head that transformers does not ship; its model card defines the classes below and
they are reproduced here (same parameter names, so ``EmotionModel.from_pretrained`` reads the checkpoint; its
config.json names the class audEERING trained with, ``Wav2Vec2ForSpeechClassification``, which nothing reads):

    hidden states (B, T, H) -> mean over T -> (B, H) -> dropout -> dense (H->H) -> tanh -> dropout
    -> out_proj (H->3) = arousal, dominance, valence, each roughly in [0, 1]

The backbone is the "large-robust" kind (``feat_extract_norm = "layer"``, ``do_stable_layer_norm``: layer norms
in the convolutional encoder and before each transformer block), H = 1024; the tiny model of the tests is built
from the same config.json with only sizes changed (``tiny_models/real_configs``).

Input: 16 kHz mono audio, normalised by the checkpoint's feature extractor (zero mean, unit variance). Its
``return_attention_mask`` is moot here: the mean over T has no mask (as in the model card), so inputs are never
padded; ``preprocess.audio.valence_arousal`` batches only windows of equal length.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Wav2Vec2Model, Wav2Vec2PreTrainedModel

# The order of the head's outputs, as the model card states it.
OUTPUTS = ("arousal", "dominance", "valence")


class RegressionHead(nn.Module):
    """Dense -> tanh -> dropout -> out_proj, on the mean-pooled hidden state (model card's head)."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.final_dropout)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.dropout(features)
        x = torch.tanh(self.dense(x))
        return self.out_proj(self.dropout(x))


class EmotionModel(Wav2Vec2PreTrainedModel):
    """Wav2Vec2Model + RegressionHead. ``forward(input_values (B, N))`` returns ``(pooled (B, H), (B, 3))``:
    the mean-pooled last hidden state (the embedding) and arousal, dominance, valence."""

    def __init__(self, config):
        super().__init__(config)
        self.config = config
        self.wav2vec2 = Wav2Vec2Model(config)
        self.classifier = RegressionHead(config)
        self.post_init()

    def forward(self, input_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states = self.wav2vec2(input_values)[0]
        pooled = hidden_states.mean(dim=1)
        return pooled, self.classifier(pooled)

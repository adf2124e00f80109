"""The loss experts mean something: ``synchrorama train-experts`` trains a sync expert on clips whose mouth follows
real (espeak-ng) speech, written as shards by the project's writer, and it detects a known audio delay on held-out
clips; stage 2 refuses weighted pixel losses without trained experts; at the full config eq. 2 sees several sync
windows and its misalignment term depends on the frames; eq. 3 sees several 50%-overlap windows."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import torch
from test_train_loader import write_training_shards
from typer.testing import CliRunner

from model.config import full_config, tiny_config
from model.experts import LIP_LANDMARKS, MissingExpertError, SyncNetExpert, load_expert_weights, mouth_box
from model.losses import sync_loss, window_means
from model.training.tiny_components import tiny_audio_encoder
from model.training.train import audio_features, main
from model.training.train_experts import ExpertTrainingConfig, load_clips, split_clips
from shards.schema import (
    AUDIO_SAMPLES_PER_FRAME,
    FPS,
    FRAME_SIZE,
    SAMPLE_RATE,
    ShardSample,
    clip_metadata,
    encode_json,
)
from shards.writer import write_shards
from synchrorama.cli import app
from synchrorama.sample_data import speech_wav

REPO = Path(__file__).resolve().parent.parent
SENTENCES = ("Good evening and welcome to the news.", "The weather will be cold and wet tomorrow.",
             "Markets closed higher after a quiet day.", "Thank you for joining us this morning.",
             "We will be right back after the break.", "Scientists found water on a distant planet.",
             "The match ended in a draw last night.", "Traffic is heavy on the northern bridge.",
             "A new museum opens its doors on Friday.", "Prices of fruit fell sharply in spring.",
             "The mayor spoke to reporters at noon.", "Rain is expected over the whole weekend.")
FRAMES = 75  # 3 s


def _speech(directory: Path, text: str) -> np.ndarray:
    """espeak-ng speech resampled to 16 kHz, cut or padded to FRAMES frames."""
    audio, rate = soundfile.read(speech_wav(directory / "speech.wav", text), dtype="float32")
    samples = FRAMES * AUDIO_SAMPLES_PER_FRAME
    resampled = np.interp(np.arange(samples) * rate / SAMPLE_RATE, np.arange(len(audio)), audio, right=0.0)
    return (0.8 * resampled / np.abs(resampled).max()).astype(np.float32)


def _talking_face(audio: np.ndarray, shift_x: int, shift_y: int) -> tuple[bytes, np.ndarray]:
    """A 512 px H.264 face whose mouth opens with the audio's loudness in each frame, and its lip landmarks."""
    rms = np.sqrt((audio.reshape(FRAMES, -1) ** 2).mean(1))
    opening = np.sqrt(rms / rms.max())
    y, x = np.mgrid[0:FRAME_SIZE, 0:FRAME_SIZE]
    cx, cy = 256 + shift_x, 230 + shift_y
    mouth_y, half_width = cy + 110, 70
    face = ((x - cx) / 150) ** 2 + ((y - cy) / 195) ** 2 < 1
    eyes = (((x - cx + 55) / 22) ** 2 + ((y - cy + 40) / 12) ** 2 < 1) | (((x - cx - 55) / 22) ** 2 + ((y - cy + 40) / 12) ** 2 < 1)
    landmarks = np.full((FRAMES, 478, 3), np.nan, np.float32)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS, options={"preset": "ultrafast", "crf": "18"})
        stream.width = stream.height = FRAME_SIZE
        stream.pix_fmt = "yuv420p"
        for i in range(FRAMES):
            half_height = 6 + 60 * opening[i]
            mouth = ((x - cx) / half_width) ** 2 + ((y - mouth_y) / half_height) ** 2 < 1
            image = np.empty((FRAME_SIZE, FRAME_SIZE, 3), np.uint8)
            image[:] = (40, 70, 90)
            image[face] = (225, 180, 150)
            image[eyes] = (30, 30, 30)
            image[mouth] = (90, 10, 20)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            angles = np.linspace(0, 2 * np.pi, len(LIP_LANDMARKS), endpoint=False)
            landmarks[i] = (cx / FRAME_SIZE, cy / FRAME_SIZE, 0.0)  # the rest of the face mesh, roughly
            landmarks[i, list(LIP_LANDMARKS), 0] = (cx + half_width * np.cos(angles)) / FRAME_SIZE
            landmarks[i, list(LIP_LANDMARKS), 1] = (mouth_y + half_height * np.sin(angles)) / FRAME_SIZE
        container.mux(stream.encode())
    return buffer.getvalue(), landmarks.astype(np.float16)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_talking_shards(directory: Path, scratch: Path) -> Path:
    """Shards (pipeline format, ``shards.writer``) of talking faces with wav2vec.npy from the tiny model's encoder."""
    d = tiny_config().data
    torch.manual_seed(0)
    encoder = tiny_audio_encoder(tiny_config()).eval()
    samples = []
    for i, text in enumerate(SENTENCES):
        audio = _speech(scratch, text)
        mp4, landmarks = _talking_face(audio, shift_x=(i % 5 - 2) * 12, shift_y=(i % 3 - 1) * 10)
        wav = io.BytesIO()
        soundfile.write(wav, audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")
        features = audio_features(encoder, torch.from_numpy(audio)[None], FRAMES)[0]
        assert features.shape == (FRAMES, d.wav2vec_layers, d.wav2vec_dim)
        members = {"mp4": mp4, "wav": wav.getvalue(), "landmarks.npy": _npy(landmarks),
                   "pose.npy": _npy(np.zeros((FRAMES, 3), np.float32)), "wav2vec.npy": _npy(features.numpy().astype(np.float16)),
                   "aus.npy": _npy(np.zeros((FRAMES, d.au_count), np.float32)),
                   "json": encode_json(clip_metadata(clip_id=f"talk{i:02d}", source=f"talk{i}.mp4", dataset="test",
                                                     n_frames=FRAMES))}
        samples.append(ShardSample(f"talk{i:02d}", members, content_key=str(i)))
    write_shards(samples, directory, max_samples_per_shard=6)
    return directory


@pytest.fixture(scope="module")
def talking_shards(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("speech")
    return write_talking_shards(tmp_path_factory.mktemp("talking-shards"), scratch)


@pytest.fixture(autouse=True)
def _both_cores(two_torch_threads):
    yield


def test_mouth_box_follows_the_stored_lip_landmarks():
    landmarks = torch.full((4, 478, 3), float("nan"))
    landmarks[1:, list(LIP_LANDMARKS), 0] = torch.linspace(0.4, 0.6, len(LIP_LANDMARKS))
    landmarks[1:, list(LIP_LANDMARKS), 1] = 0.7
    box = mouth_box(landmarks)  # frame 0 has no face and is ignored
    assert torch.allclose(box, torch.tensor([0.5 - 0.18, 0.7 - 0.09, 0.5 + 0.18, 0.7 + 0.09]), atol=1e-4)
    with pytest.raises(ValueError, match="no frame has face landmarks"):
        mouth_box(landmarks[:1])


def test_train_experts_detects_a_known_audio_delay_on_heldout_clips(talking_shards, tmp_path):
    out = tmp_path / "experts"
    result = CliRunner().invoke(app, ["train-experts", "--shards", str(talking_shards), "--out", str(out),
                                      "--model-size", "tiny", "--sync-steps", "250", "--regressor-steps", "20",
                                      "--batch-size", "16", "--lr", "3e-3", "--shift-range", "6", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "experts.json").read_text())
    sync = summary["trained"]["sync"]
    assert sync["pair_accuracy"] > 0.65, sync  # chance: 0.5 (measured 0.80; silent windows are ambiguous)
    assert sync["offset_within_1_frame"] > 0.7, sync  # chance: 3/13
    # the shards have AUs (zeros) but no emotion or description: those experts are skipped, and say why
    assert set(summary["trained"]) == {"sync", "au"} and set(summary["skipped"]) == {"valence_arousal", "description"}
    assert "emotion.npz" in summary["skipped"]["valence_arousal"]

    # the saved expert, loaded as stage 2 loads it, finds audio delayed by 5 frames on every held-out clip
    cfg = tiny_config()
    expert = load_expert_weights(SyncNetExpert(cfg), str(out / "sync.safetensors"))
    assert torch.allclose(expert.default_mouth_box, torch.tensor(sync["default_mouth_box"]), atol=1e-3)
    spec = ExpertTrainingConfig(shards=str(talking_shards), out=str(out), heldout_fraction=0.2)
    clips = load_clips(spec, cfg, expert, torch.device("cpu"))
    _, held = split_clips(clips, spec.heldout_fraction, spec.seed)
    assert sorted(c.clip_id for c in held) == sorted(summary["clips"]["heldout"])
    for delay in (5, -5, 0):
        for clip in held:
            mouths = clip.mouths.float()[None] / 127.5 - 1
            audio = clip.audio.float()[None]
            margin, length = 6, FRAMES - 12
            offset, _ = expert.detect_offset_from_mouths(mouths[:, margin:margin + length],
                                                         audio[:, margin - delay:margin - delay + length], 6)
            assert abs(int(offset) - delay) <= 1, (clip.clip_id, delay, int(offset))


def test_stage2_refuses_weighted_pixel_losses_without_trained_experts(tmp_path):
    shards = write_training_shards(tmp_path / "shards", n_clips=2, frames=12)
    base = ["--config", str(REPO / "configs" / "train_tiny.toml"), "--shards", str(shards), "--out",
            str(tmp_path / "run"), "stage=stage2", "max_steps=1", "val_samples=0", "num_workers=0"]
    with pytest.raises(MissingExpertError) as error:
        main([*base, "untrained_experts=false", "loss_emo=0", "loss_au=0", "loss_attr_action=0"])
    message = str(error.value)
    assert "loss_sync=0.05" in message and "synchrorama train-experts" in message
    assert "experts= is empty" in message
    experts = tmp_path / "experts"
    experts.mkdir()
    with pytest.raises(MissingExpertError, match=r"loss_au=0.05 .* at .*experts/au.safetensors"):
        main([*base, "untrained_experts=false", f"experts={experts}", "loss_sync=0", "loss_emo=0",
              "loss_attr_action=0"])
    # every pixel loss off: nothing to refuse
    result = main([*base, "untrained_experts=false", "loss_sync=0", "loss_emo=0", "loss_au=0", "loss_attr_action=0"])
    assert [r["step"] for r in result.records] == [1]


def test_full_config_sync_loss_sees_several_windows_and_a_frame_dependent_misalignment():
    cfg = full_config()
    n = cfg.recipe.pixel_frames
    windows = n - cfg.sync_window + 1
    assert windows > 1
    torch.manual_seed(0)
    expert = SyncNetExpert(cfg).eval()
    audio = torch.randn(1, n, cfg.data.wav2vec_layers, cfg.data.wav2vec_dim)
    frames = torch.rand(2, n, 3, 128, 128) * 2 - 1  # two different videos, same audio
    assert expert.embed_video(frames).shape[:2] == (2, windows)
    with torch.no_grad():
        estimate = expert.estimate(frames, audio.expand(2, -1, -1, -1))
    assert estimate.misalignment_s[0] != estimate.misalignment_s[1]
    ones = torch.ones(2, n, 3, 128, 128)
    with torch.no_grad():
        same = expert.estimate(torch.cat([ones[:1], -ones[1:]]), audio.expand(2, -1, -1, -1))
        truth = expert.estimate(frames, audio.expand(2, -1, -1, -1))
    # eq. 2 differs between two generated videos scored against the same ground truth
    assert sync_loss(same, truth) != sync_loss(expert.estimate(frames.flip(0), audio.expand(2, -1, -1, -1)), truth)
    # eq. 3: several 50%-overlap windows over the decoded frames
    window = cfg.recipe.emo_window_frames
    assert window_means(torch.randn(1, n, 2), window, window // 2).shape[1] > 1
    assert 0 < cfg.recipe.pixel_loss_max_timestep < cfg.recipe.num_train_timesteps


def test_train_experts_reads_only_shards_that_match_their_manifest(talking_shards, tmp_path, caplog):
    shards = Path(shutil.copytree(talking_shards, tmp_path / "shards"))
    tar = shards / "shard-000000.tar"
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the manifest's sha256 can tell
    tar.write_bytes(bytes(data))
    spec = ExpertTrainingConfig(shards=str(shards), out=str(tmp_path / "experts"))
    cfg = tiny_config()
    with caplog.at_level(logging.WARNING):
        clips = load_clips(spec, cfg, SyncNetExpert(cfg), torch.device("cpu"))
    intact = json.loads((shards / "shard-000001.json").read_text())["clip_ids"]
    assert sorted(c.clip_id for c in clips) == sorted(intact)  # nothing of the damaged shard is delivered
    assert any("lost to shards that failed their manifest check" in r.getMessage() for r in caplog.records)

"""SD-layout weights load into the inflated model; at step 0 it equals the image UNet frame by frame."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from model.conditions import FrameConditions
from model.config import tiny_config
from model.denoising_unet import is_new_layer
from model.synchrorama import SynchroRamaModel
from model.training.tiny_components import tiny_image_unet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def saved_image_unet(tmp_path_factory):
    cfg = tiny_config()
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sd") / "unet"
    tiny_image_unet(cfg).save_pretrained(folder)
    return cfg, folder.parent


def test_only_new_layers_are_missing(saved_image_unet):
    cfg, folder = saved_image_unet
    image_unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", low_cpu_mem_usage=False)
    model = SynchroRamaModel(cfg)
    missing = model.denoiser.load_image_unet_weights(image_unet.state_dict())
    assert missing and all(is_new_layer(k) for k in missing)
    assert {k.split(".processor.")[-1].split(".")[0] for k in missing if ".processor." in k} == {
        "audio_attention", "emotion_attention"}
    new_layers = {n for n in model.denoiser.unet.state_dict() if is_new_layer(n)}  # incl. position buffers
    assert set(missing) == new_layers
    result = model.reference_net.unet.load_state_dict(image_unet.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with pytest.raises(ValueError):
        model.denoiser.load_image_unet_weights({**image_unet.state_dict(), "extra.weight": torch.zeros(1)})


def test_step0_equals_image_unet_frame_by_frame(saved_image_unet):
    cfg, folder = saved_image_unet
    image_unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", low_cpu_mem_usage=False).eval()
    model = SynchroRamaModel.from_image_unet(cfg, str(folder)).eval()
    d = cfg.data
    b, m, t = 2, cfg.motion_frames, cfg.clip_frames
    noisy = torch.randn(b, t, 4, d.latent_size, d.latent_size)
    motion = torch.randn(b, m, 4, d.latent_size, d.latent_size)
    description = torch.randn(b, d.text_tokens, d.text_dim)
    timesteps = torch.tensor([17, 640])
    # audio and emotion are present: their zero-initialised attentions must add nothing yet
    conditions = FrameConditions(audio_tokens=torch.randn(b, m + t, cfg.audio_tokens, cfg.cross_attention_dim),
                                 emotion_tokens=torch.randn(b, m + t, cfg.emotion_tokens, cfg.cross_attention_dim))
    with torch.no_grad():
        video = model(noisy, timesteps, motion, description, conditions)
        for frame in range(t):
            image = image_unet(noisy[:, frame], timesteps, encoder_hidden_states=description).sample
            torch.testing.assert_close(video[:, frame], image, atol=1e-5, rtol=1e-4)


def test_reference_features_pair_by_layer_name(saved_image_unet):
    cfg, folder = saved_image_unet
    model = SynchroRamaModel.from_image_unet(cfg, str(folder)).eval()
    d = cfg.data
    with torch.no_grad():
        features = model.reference_net(torch.randn(1, 4, d.latent_size, d.latent_size),
                                       torch.randn(1, d.text_tokens, d.text_dim))
    readers = {n.removesuffix(".processor") for n in model.denoiser.unet.attn_processors
               if n.endswith("attn1.processor") and "motion_modules" not in n}
    assert set(features) == readers
    # the reference changes the output; masking it (guidance dropout) restores the plain image model
    noisy = torch.randn(1, cfg.clip_frames, 4, d.latent_size, d.latent_size)
    description, t = torch.randn(1, d.text_tokens, d.text_dim), torch.tensor([100])
    with torch.no_grad():
        plain = model(noisy, t, None, description, FrameConditions())
        with_reference = model(noisy, t, None, description, FrameConditions(reference_features=features))
        masked = model(noisy, t, None, description,
                       FrameConditions(reference_features=features, reference_keep=torch.tensor([False])))
    assert not torch.allclose(plain, with_reference, atol=1e-4)
    torch.testing.assert_close(masked, plain, atol=1e-5, rtol=1e-4)

"""The sync expert (``model/syncnet.py``): syncnet_v2's layout, weight loading, inputs, and the public SyncNet
evaluation's offset/confidence on clips with a known audio shift (issue 15's known-answer test).

Expected keys and shapes of the full model are written out from the layer definitions of
joonson/syncnet_python ``SyncNetModel.py`` (class ``S``, read at commit 5befaa3); ``SyncNetInstance.
loadParameters`` copies ``syncnet_v2.model`` into ``S().state_dict()`` by name with ``copy_``, so the released
file's tensors have these names and shapes (no independently printed parameter count was found; 13,631,616
follows from these shapes).
"""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
import torch

from model.syncnet import (
    SAMPLES_PER_FRAME,
    SyncNetV2,
    SyncNetV2Size,
    SyncNetWeightsError,
    load_syncnet,
    shift_contrastive_loss,
    shift_distances,
    sync_offset,
    syncnet_mfcc,
    syncnet_video,
    window_count,
)

# (conv weight shape, out channels) per layer index of each tower, from SyncNetModel.py
AUDIO_CONVS = {0: (64, 1, 3, 3), 4: (192, 64, 3, 3), 8: (384, 192, 3, 3), 11: (256, 384, 3, 3),
               14: (256, 256, 3, 3), 18: (512, 256, 5, 4)}
LIP_CONVS = {0: (96, 3, 5, 7, 7), 4: (256, 96, 1, 5, 5), 8: (256, 256, 1, 3, 3), 11: (256, 256, 1, 3, 3),
             14: (256, 256, 1, 3, 3), 18: (512, 256, 1, 6, 6)}


def published_syncnet_v2_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for tower, convs in (("netcnnaud", AUDIO_CONVS), ("netcnnlip", LIP_CONVS)):
        for index, weight in convs.items():
            shapes[f"{tower}.{index}.weight"] = weight
            shapes[f"{tower}.{index}.bias"] = (weight[0],)
            for name in ("weight", "bias", "running_mean", "running_var"):  # the BatchNorm right after
                shapes[f"{tower}.{index + 1}.{name}"] = (weight[0],)
    for head in ("netfcaud", "netfclip"):
        shapes.update({f"{head}.0.weight": (512, 512), f"{head}.0.bias": (512,), f"{head}.1.weight": (512,),
                       f"{head}.1.bias": (512,), f"{head}.1.running_mean": (512,), f"{head}.1.running_var": (512,),
                       f"{head}.3.weight": (1024, 512), f"{head}.3.bias": (1024,)})
    return shapes


def test_full_model_has_syncnet_v2_layout_on_meta():
    with torch.device("meta"):
        model = SyncNetV2()
    state = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert state == published_syncnet_v2_shapes()
    assert sum(p.numel() for p in model.parameters()) == 13_631_616
    with torch.device("meta"):  # 224 crops and 13 x 20 MFCC reach 1 x 1 before the heads
        video_emb, audio_emb = model(torch.empty(2, 3, 5, 224, 224), torch.empty(2, 1, 13, 20))
    assert video_emb.shape == audio_emb.shape == (2, 1024)


def test_lip_tower_rejects_crops_it_cannot_reduce():
    with pytest.raises(ValueError, match="image_size=48 is too small"):
        SyncNetV2(**{**vars(SyncNetV2Size.tiny()), "image_size": 48})


def test_tiny_model_round_trips_through_load_syncnet(tmp_path):
    size = SyncNetV2Size.tiny()
    torch.manual_seed(0)
    model = SyncNetV2(**vars(size)).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "tiny.model")  # like the released file: no num_batches_tracked counters
    loaded = load_syncnet(tmp_path / "tiny.model", size=size)
    video, mfcc = torch.rand(3, 3, 5, 64, 64) * 255, torch.randn(3, 1, 13, 20)
    with torch.no_grad():
        for got, want in zip(loaded(video, mfcc), model(video, mfcc), strict=True):
            torch.testing.assert_close(got, want)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())

    with pytest.raises(SyncNetWeightsError, match=r"missing\.model.*syncnet_v2\.model is released"):
        load_syncnet(tmp_path / "missing.model")
    with pytest.raises(SyncNetWeightsError, match="mismatched"):  # tiny weights into the full-size model
        load_syncnet(tmp_path / "tiny.model")


def test_mfcc_matches_the_reference_inputs():
    rng = np.random.default_rng(0)
    frames = 10
    audio = 0.1 * rng.standard_normal(frames * SAMPLES_PER_FRAME)
    mfcc = syncnet_mfcc(audio)
    assert mfcc.shape == (13, 4 * frames - 1)  # 100 Hz: 4 MFCC frames per 25 fps video frame
    as_int16 = np.round(audio * 32768).astype(np.int16)  # what scipy reads from ffmpeg's pcm_s16le wav
    np.testing.assert_allclose(mfcc, syncnet_mfcc(as_int16))
    assert np.abs(mfcc[0] - syncnet_mfcc(audio / 32768)[0]).min() > 5  # the int16 scale moves the log energy
    with pytest.raises(ValueError, match="16000 Hz"):
        syncnet_mfcc(audio, sample_rate=44_100)


def test_video_is_resized_bgr_0_255():
    frame = np.zeros((1, 100, 100, 3), np.uint8)
    frame[..., 0] = 200  # red in RGB
    video = syncnet_video(frame, 64)
    assert video.shape == (3, 1, 64, 64) and video.dtype == torch.float32
    assert video[2].max() == 200 and video[0].max() == 0  # red is the last channel in BGR


def test_shift_distances_equal_the_reference_loop():
    """``calc_pdist``: video window i against zero-padded audio windows i - K .. i + K."""
    torch.manual_seed(0)
    video_emb, audio_emb, k = torch.randn(7, 4), torch.randn(7, 4), 3
    padded = torch.nn.functional.pad(audio_emb, (0, 0, k, k))
    expected = torch.stack([torch.nn.functional.pairwise_distance(video_emb[[i]].repeat(2 * k + 1, 1),
                                                                  padded[i:i + 2 * k + 1]) for i in range(7)])
    torch.testing.assert_close(shift_distances(video_emb, audio_emb, k), expected)
    assert window_count(num_frames=30, num_samples=28 * SAMPLES_PER_FRAME + 100) == 23


# ---- issue 15's known answer: a tiny SyncNetV2 trained here on clips whose mouth follows the audio energy ----

SIZE = 64


def loudness(rng: np.random.Generator, frames: int) -> np.ndarray:
    """Per-frame loudness in [0, 1], with a quarter of the frames silent (pauses between syllables)."""
    return rng.uniform(0, 1, frames) * (rng.uniform(0, 1, frames) > 0.25)


def talking_frames(envelope: np.ndarray) -> np.ndarray:
    """``(T, 64, 64, 3)`` RGB: a face whose mouth height is 2 + 12 * loudness pixels (sub-pixel antialiased)."""
    frames = np.empty((len(envelope), SIZE, SIZE, 3), np.uint8)
    for t, level in enumerate(envelope):
        image = np.full((SIZE, SIZE, 3), 60, np.uint8)
        cv2.ellipse(image, (32, 32), (20, 27), 0, 0, 360, (200, 160, 140), -1, cv2.LINE_AA)
        for x in (24, 40):
            cv2.circle(image, (x, 24), 3, (40, 40, 40), -1, cv2.LINE_AA)
        # fixed-point coordinates (shift=4: 1/16 pixel) so that the height follows the loudness smoothly
        cv2.ellipse(image, (32 * 16, 45 * 16), (9 * 16, int(16 * (1 + 6 * level))), 0, 0, 360, (80, 20, 30), -1,
                    cv2.LINE_AA, 4)
        frames[t] = image
    return frames


def talking_audio(envelope: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """16 kHz noise whose amplitude follows the loudness frame by frame (4 ms ramps, no clicks)."""
    amplitude = np.convolve(np.repeat(0.01 + 0.4 * envelope, SAMPLES_PER_FRAME), np.ones(64) / 64, mode="same")
    return np.clip(amplitude * rng.standard_normal(amplitude.size), -1, 1)


def delay_audio(audio: np.ndarray, frames: int) -> np.ndarray:
    """The audio played ``frames`` video frames late (negative: early), silence filling the gap."""
    samples = abs(frames) * SAMPLES_PER_FRAME
    if frames >= 0:
        return np.concatenate([np.zeros(samples), audio[:audio.size - samples]])
    return np.concatenate([audio[samples:], np.zeros(samples)])


def train_tiny_expert(frames: np.ndarray, audio: np.ndarray, rng: np.random.Generator,
                      steps: int = 200) -> SyncNetV2:
    """A tiny SyncNetV2 (64 x 64 crops) trained on one in-sync clip: ``frames (T, H, W, 3)`` RGB uint8 face
    crops at 25 fps, ``audio (T * 640,)`` 16 kHz (float or int16); ``rng`` draws the batches. In eval mode.
    Also used by tests/test_sync_filter.py on clips the pipeline standardised."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared; also makes the run reproducible
    try:
        video = syncnet_video(frames, SIZE)
        mfcc = torch.from_numpy(syncnet_mfcc(audio).astype(np.float32))
        windows = window_count(len(frames), len(audio))
        torch.manual_seed(0)
        model = SyncNetV2(**vars(SyncNetV2Size.tiny()))
        optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
        shifts, batch = np.arange(-3, 4), 32  # negatives: the same window's neighbouring audio windows
        started = time.perf_counter()
        for _ in range(steps):
            starts = rng.integers(3, windows - 3, batch)
            lips = torch.stack([video[:, t:t + 5] for t in starts])
            audio_starts = (starts[:, None] + shifts[None]).ravel()
            audio_windows = torch.stack([mfcc[None, :, 4 * t:4 * t + 20] for t in audio_starts])
            loss = shift_contrastive_loss(model.forward_lip(lips),
                                          model.forward_aud(audio_windows).view(batch, len(shifts), -1), true_shift=3)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        print(f"trained tiny SyncNetV2 in {time.perf_counter() - started:.1f} s, last loss {loss.item():.3f}")
        return model.eval()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_expert():
    """Trains a tiny SyncNetV2 (64 x 64 crops) for 200 steps on a 32 s generated clip: about 23 s on 1 core."""
    rng = np.random.default_rng(0)
    envelope = loudness(rng, 800)
    return train_tiny_expert(talking_frames(envelope), talking_audio(envelope, rng), rng)


@pytest.mark.parametrize("delay, expected_offset", [(0, 0), (3, -3), (-4, 4)])
def test_sync_offset_recovers_a_known_audio_shift(trained_expert, delay, expected_offset):
    """syncnet_python's sign: audio delayed by 3 frames (it lags the mouth) gives offset -3; audio 4 frames
    early (it leads) gives +4."""
    rng = np.random.default_rng(1)  # a clip the expert never saw
    envelope = loudness(rng, 150)
    measure = sync_offset(trained_expert, talking_frames(envelope), delay_audio(talking_audio(envelope, rng), delay))
    assert abs(measure.offset_frames - expected_offset) <= 1, measure
    assert measure.distances.shape == (window_count(150, 150 * SAMPLES_PER_FRAME), 31)
    assert measure.lse_d == measure.min_distance == pytest.approx(measure.mean_distances.min())
    assert measure.lse_c == pytest.approx(np.median(measure.mean_distances) - measure.mean_distances.min())


def test_confidence_separates_synced_from_unrelated_audio(trained_expert):
    rng = np.random.default_rng(2)
    envelope = loudness(rng, 150)
    frames = talking_frames(envelope)
    synced = sync_offset(trained_expert, frames, talking_audio(envelope, rng))
    unrelated = [sync_offset(trained_expert, frames, talking_audio(loudness(rng, 150), rng)) for _ in range(3)]
    print(f"confidence synced {synced.confidence:.3f} vs unrelated {[round(m.confidence, 3) for m in unrelated]};"
          f" min distance {synced.min_distance:.3f} vs {[round(m.min_distance, 3) for m in unrelated]}")
    assert synced.offset_frames == 0
    assert synced.confidence > 3 * max(m.confidence for m in unrelated)
    assert synced.min_distance < min(m.min_distance for m in unrelated)

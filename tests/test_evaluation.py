"""Evaluation metrics with known answers, and ``synchrorama evaluate`` end to end on tiny feature networks."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from evaluation import metrics, networks
from evaluation.expression import MeshExpression
from evaluation.settings import load_evaluation_settings


def _clip(seed: int, frames: int = 3, size: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # smooth content (SSIM of pure noise is uninformative): a gradient plus a blob, with mild texture
    y, x = np.mgrid[:size, :size] / size
    base = np.stack([x, y, 0.5 * (x + y)], -1)[None] * 200 + rng.normal(0, 8, (frames, size, size, 3))
    return np.clip(base + 20, 0, 255).astype(np.uint8)


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------------------ PSNR / SSIM


def test_psnr_ssim_identical_and_against_scikit_image():
    truth = _clip(0)
    assert metrics.psnr(truth, truth) == math.inf
    assert metrics.ssim(truth, truth) == pytest.approx(1.0, abs=1e-9)
    noise = np.random.default_rng(1).normal(0, 12, truth.shape)
    noisy = np.clip(truth + noise, 0, 255).astype(np.uint8)
    expected_psnr = np.mean([sk_psnr(t, g, data_range=255) for t, g in zip(truth, noisy, strict=True)])
    expected_ssim = np.mean([sk_ssim(t / 255.0, g / 255.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     data_range=1.0, channel_axis=-1) for t, g in zip(truth, noisy, strict=True)])
    assert metrics.psnr(noisy, truth) == pytest.approx(expected_psnr, abs=1e-6)
    assert 20 < expected_psnr < 35
    assert metrics.ssim(noisy, truth) == pytest.approx(expected_ssim, abs=2e-3)
    assert expected_ssim < 0.95
    with pytest.raises(ValueError, match="one shape"):
        metrics.psnr(noisy[:2], truth)


# ---------------------------------------------------------------------------------------------------- CCC


def test_ccc_closed_forms():
    x = np.sin(np.linspace(0, 6, 50)) + 0.3
    n = len(x)
    var = x.var(ddof=1)
    assert metrics.ccc(x, x) == pytest.approx(1.0)
    # negated: cov = -var, mean gap 2 mean(x)
    assert metrics.ccc(-x, x) == pytest.approx(-2 * var / (2 * var + (2 * x.mean()) ** 2))
    # shifted by c: cov = var, mean gap c
    c = 0.7
    assert metrics.ccc(x + c, x) == pytest.approx(2 * var / (2 * var + c ** 2))
    assert n == 50 and metrics.ccc(x[:1], x[:1]) != metrics.ccc(x[:1], x[:1])  # NaN below two pairs


# -------------------------------------------------------------------------------------------- Frechet distances


def test_frechet_distance_known_answer_and_torchmetrics_fid():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3))
    # same covariance, mean shifted by (1, 2, 0): the distance is ||mu||^2 = 5 up to sampling error
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert metrics.frechet_distance(a + [1, 2, 0], a) == pytest.approx(5.0, rel=1e-6)

    from torchmetrics.image.fid import FrechetInceptionDistance

    inception = networks.tiny_inception()
    real = torch.from_numpy(_clip(2, frames=12, size=40)).permute(0, 3, 1, 2)
    fake = torch.from_numpy(_clip(3, frames=12, size=40)[:, ::-1].copy()).permute(0, 3, 1, 2)
    fid = FrechetInceptionDistance(feature=inception, normalize=True)
    fid.update(real.float() / 255, real=True)
    fid.update(fake.float() / 255, real=False)
    ours = metrics.frechet_distance(metrics.inception_features(inception, fake.permute(0, 2, 3, 1).numpy()),
                                    metrics.inception_features(inception, real.permute(0, 2, 3, 1).numpy()))
    assert ours == pytest.approx(float(fid.compute()), rel=1e-3, abs=1e-5)


def test_fid_fvd_of_a_set_against_itself_and_a_shifted_set(tmp_path):
    inception = networks.tiny_inception()
    i3d = networks.load_i3d(networks.save_tiny_i3d(tmp_path / "i3d.pt"))
    clips = [_clip(seed, frames=32, size=40) for seed in range(3)]
    brighter = [np.clip(c.astype(int) + 60, 0, 255).astype(np.uint8) for c in clips]
    fid = [metrics.inception_features(inception, c, stride=2) for c in clips]
    fid_shifted = [metrics.inception_features(inception, c, stride=2) for c in brighter]
    assert metrics.set_distance(fid, fid) == pytest.approx(0.0, abs=1e-6)
    assert metrics.set_distance(fid_shifted, fid) > 1e3 * max(metrics.set_distance(fid, fid), 1e-9)
    fvd = [metrics.video_features(i3d, c) for c in clips]
    assert fvd[0].shape == (2, 16)  # two 16-frame windows of a 32-frame clip
    fvd_shifted = [metrics.video_features(i3d, c) for c in brighter]
    assert metrics.set_distance(fvd, fvd) == pytest.approx(0.0, abs=1e-6)
    assert metrics.set_distance(fvd_shifted, fvd) > 1e-3


def test_i3d_and_weight_loaders_fail_with_the_download_to_make(tmp_path):
    with pytest.raises(networks.WeightsError, match="i3d_torchscript.pt"):
        networks.load_i3d(tmp_path / "missing.pt")
    with pytest.raises(networks.WeightsError, match="pytorch-fid"):
        networks.load_inception(tmp_path / "missing.pth")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "wrong.pth")
    with pytest.raises(networks.WeightsError, match="is not pt_inception"):
        networks.load_inception(tmp_path / "wrong.pth")


# -------------------------------------------------------------------------------------------------- LPIPS


def test_lpips_matches_torchmetrics_with_the_same_backbone(tmp_path, monkeypatch):
    """torchmetrics' own LPIPS (fed the backbone through the hook it gets torchvision's from) and ours, with the
    same AlexNet weights and torchmetrics' bundled v0.1 heads, agree; identical images give 0."""
    import torchmetrics.functional.image.lpips as tm_lpips

    torch.manual_seed(0)
    ours = networks.AlexNetLPIPS()
    torch.save({k: v for k, v in ours.state_dict().items() if k.startswith("features.")}, tmp_path / "alexnet.pth")
    ours = networks.load_lpips(tmp_path / "alexnet.pth")  # heads: torchmetrics' bundled file
    monkeypatch.setattr(tm_lpips, "_get_tv_model_features",
                        lambda net, pretrained=False: torch.nn.Sequential(*ours.features, torch.nn.MaxPool2d(3, 2)))
    theirs = tm_lpips._LPIPS(pretrained=True, net="alex")
    a = torch.from_numpy(_clip(4, frames=2, size=64)).permute(0, 3, 1, 2).float() / 255
    b = torch.from_numpy(_clip(5, frames=2, size=64)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        expected = theirs(a, b, normalize=True).flatten()
        got = ours(a, b)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6) and float(got.min()) > 0
    assert metrics.lpips(ours, _clip(4), _clip(4)) == pytest.approx(0.0, abs=1e-7)


# ------------------------------------------------------------------------------------------- E-FID and AU F1


@pytest.fixture(scope="module")
def face_mesh_points():
    from skimage import data

    from preprocess.video.face_models import mesh_landmarks, new_face_mesh

    mesh = new_face_mesh(video_mode=False, refine_landmarks=True)
    points = mesh_landmarks(mesh, data.astronaut())
    mesh.close()
    assert points is not None
    return points.astype(np.float64)


def _talking(points: np.ndarray, amplitude: float, frames: int = 60, seed: int = 0) -> np.ndarray:
    """A landmark track whose lower lip and chin move down by ``amplitude`` (image units) following a random
    'speech' envelope."""
    from evaluation.expression import EXPRESSION_LANDMARKS

    rng = np.random.default_rng(seed)
    envelope = np.abs(np.convolve(rng.normal(size=frames + 4), np.ones(5) / 5, mode="valid"))
    track = np.repeat(points[None], frames, axis=0)
    lower = [i for i in (14, 17, 84, 314, 87, 317, 152, 148, 377) if i in EXPRESSION_LANDMARKS]
    track[:, lower, 1] += amplitude * envelope[:, None]
    return track


def _posed(track: np.ndarray, yaw: float, scale: float, shift: float) -> np.ndarray:
    from preprocess.video.head_pose import rotation_matrix

    rot = rotation_matrix(yaw, 10.0, -5.0)
    # into camera axes (y up, z to the viewer), rotate about the face centre, back to image axes
    cam = track * [1, -1, -1]
    centre = cam.mean(axis=1, keepdims=True)
    cam = (cam - centre) @ rot.T * scale + centre
    return cam * [1, -1, -1] + [shift, 0, 0]


def test_expression_coefficients_remove_pose_and_scale_and_efid_orders_sets(face_mesh_points):
    extractor = MeshExpression()
    track = _talking(face_mesh_points, 0.02)
    coefficients = extractor.coefficients(track)
    assert coefficients.shape == (60, extractor.dim) == (60, 117)
    moved = extractor.coefficients(_posed(track, yaw=25.0, scale=0.7, shift=0.1))
    assert np.allclose(moved, coefficients, atol=1e-6)  # same expression, other pose and face size
    truth = [extractor.coefficients(_talking(face_mesh_points, 0.02, seed=s)) for s in range(3)]
    same = [extractor.coefficients(_talking(face_mesh_points, 0.02, seed=s + 10)) for s in range(3)]
    exaggerated = [extractor.coefficients(_talking(face_mesh_points, 0.05, seed=s + 10)) for s in range(3)]
    assert metrics.set_distance(truth, truth) == pytest.approx(0.0, abs=1e-6)
    assert metrics.set_distance(exaggerated, truth) > 3 * metrics.set_distance(same, truth)
    nan_row = track.copy()
    nan_row[5] = np.nan
    assert np.isnan(extractor.coefficients(nan_row)[5]).all()


def test_au_f1_known_answers():
    truth = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 1.0], [3.0, 0.0]])
    assert metrics.au_f1(truth, truth, quantile=0.5) == pytest.approx(1.0)
    # AU0 threshold (median of 0..3) = 1.5: truth active at frames 2, 3; prediction active at 3 only -> F1 2/3
    # AU1 threshold 0.5: truth active at 0, 2; prediction identical -> 1
    predicted = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [3.0, 0.0]])
    assert metrics.au_f1(predicted, truth, quantile=0.5) == pytest.approx((2 / 3 + 1) / 2)
    assert metrics.au_f1(predicted, truth, quantile=None, threshold=0.5) == pytest.approx((1.0 + 1.0) / 2)


# ----------------------------------------------------------------------------------------- synchrorama evaluate


def test_evaluate_command_fills_every_column(tmp_path):
    from typer.testing import CliRunner

    from model.generation.video_io import write_video
    from synchrorama.cli import app
    from synchrorama.sample_data import make_talking_video

    truth_dir, generated_dir, out = tmp_path / "truth", tmp_path / "generated", tmp_path / "eval"
    generated_dir.mkdir()
    rng = np.random.default_rng(0)
    for index, clip_id in enumerate(("clip_a", "clip_b")):
        truth = make_talking_video(truth_dir / f"{clip_id}.mp4", seconds=1.6, width=128, height=128, fps=25.0,
                                   variant=index)
        from evaluation.evaluate import read_audio, read_frames

        frames, audio = read_frames(truth), read_audio(truth)
        noisy = np.clip(frames + rng.normal(0, 10, frames.shape), 0, 255).astype(np.uint8)
        write_video(noisy, generated_dir / f"{clip_id}.mp4", 25, audio, 16000)
    (truth_dir / "unmatched.mp4").write_bytes((truth_dir / "clip_a.mp4").read_bytes())

    result = CliRunner().invoke(app, ["evaluate", "--generated", str(generated_dir), "--ground-truth", str(truth_dir),
                                      "--out", str(out), "--profile", "tiny", "--no-progress",
                                      "--settings", '{"va_window_s": 0.5}'])
    assert result.exit_code == 0, result.output
    assert "MEAN NOTHING" in result.output and "PSNR" in result.output
    clips = pq.read_table(out / "clips.parquet").to_pylist()
    assert [row["clip_id"] for row in clips] == ["clip_a", "clip_b"]
    summary = pq.read_table(out / "summary.parquet").to_pylist()[0]
    from evaluation.evaluate import TABLE_COLUMNS

    for _name, key, _arrow in TABLE_COLUMNS:
        assert summary[key] is not None and math.isfinite(summary[key]), (key, summary[key])
        for row in clips:
            assert row[key] is not None and math.isfinite(row[key]), (row["clip_id"], key, row[key], row["notes"])
    assert 20 < summary["psnr"] < 40 and 0 < summary["ssim"] < 1
    assert all(row["face_fraction"] > 0.9 for row in clips)
    table = (out / "table.md").read_text()
    assert "unmatched" in table and "AUDIO-based" in table and "| clip_b |" in table
    assert b"synchrorama_evaluation" in pq.read_schema(out / "clips.parquet").metadata
    assert load_evaluation_settings("tiny").is_tiny

"""Shot cuts, face sharpness and identity change (issue 14 items 2, 6 and the identity half of 4).

Real components throughout: generated videos written by ffmpeg with espeak-ng speech, the real video stages
(probe, locate, standardise, MediaPipe face mesh) and ``run_select``, which decodes the standardised clip once
for the content scores and sharpness. The videos are built from scikit-image's astronaut photo: hard cuts are
changes of background and framing; the "other person" is the same photo stretched 1.3x horizontally, whose
facial proportions differ as two people's do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage import data as skimage_data
from skimage.transform import resize

from preprocess.pipeline import (
    Workspace,
    run_clip_stages,
)
from preprocess.run.media import feed_stdin, media_limits
from preprocess.run.records import Candidate
from preprocess.run.settings import load_settings
from preprocess.video.filters import PieceStats, judge_piece, plan_pieces
from preprocess.video.identity import LandmarkGeometry, identity_change
from preprocess.video.shots import content_score, find_cuts, hsv_frame
from synchrorama.sample_data import speech_wav

WIDTH, HEIGHT, FPS = 640, 360, 30
# standardised clips run at 25 fps
CLIP_FPS = 25
BACKGROUNDS = {"blue": (30, 60, 150), "amber": (200, 140, 30), "green": (40, 140, 60)}
# each shot's light tints the face too (the square crop around the face may show no background at all)
TINTS = {"blue": (0.85, 0.9, 1.1), "amber": (1.1, 1.0, 0.8), "green": (0.9, 1.1, 0.9)}


def _face(stretch: float = 1.0) -> np.ndarray:
    """The astronaut's head and shoulders, 220 px high (face ~85 px), optionally stretched horizontally."""
    patch = skimage_data.astronaut()[10:290, 85:365]
    height = 220
    width = int(round(patch.shape[1] * height / patch.shape[0] * stretch))
    return (resize(patch, (height, width), anti_aliasing=True) * 255).astype(np.uint8)


def _frames(segments: list[tuple[float, str, float, int]]):
    """RGB frames of consecutive segments (seconds, light: background colour and face tint, face stretch,
    horizontal offset px); the face drifts a few pixels so that it is not a still image."""
    faces = {}
    index = 0
    for seconds, background, stretch, offset in segments:
        face = np.clip(faces.setdefault(stretch, _face(stretch)) * np.asarray(TINTS[background]), 0, 255)
        face = face.astype(np.uint8)
        for _ in range(int(round(seconds * FPS))):
            frame = np.empty((HEIGHT, WIDTH, 3), np.uint8)
            frame[:] = BACKGROUNDS[background]
            frame[:, :, 1] = np.clip(frame[:, :, 1].astype(int) + np.linspace(0, 40, WIDTH).astype(int), 0, 255)
            drift = int(round(4 * np.sin(2 * np.pi * index / (FPS * 3))))
            ph, pw = face.shape[:2]
            x = (WIDTH - pw) // 2 + offset + drift
            y = (HEIGHT - ph) // 2
            frame[y:y + ph, x:x + pw] = face
            index += 1
            yield frame


def write_video(path: Path, segments: list[tuple[float, str, float, int]], blur_sigma: float = 0.0) -> Path:
    """An H.264/AAC mp4 of the segments with looping espeak-ng speech; ``blur_sigma`` > 0 blurs every frame
    (ffmpeg's gblur) to make a blurred copy of the same content."""
    seconds = sum(segment[0] for segment in segments)
    speech = speech_wav(path.with_suffix(".speech.wav"))
    command = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{WIDTH}x{HEIGHT}", "-r", str(FPS), "-i", "-", "-stream_loop", "-1", "-i", str(speech),
               "-map", "0:v", "-map", "1:a", "-c:a", "aac", "-b:a", "64k"]
    if blur_sigma:
        command += ["-vf", f"gblur=sigma={blur_sigma}"]
    command += ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "18", "-pix_fmt", "yuv420p",
                "-t", f"{seconds:.3f}", str(path)]
    with feed_stdin(command, purpose=f"writing {path}", timeout_s=media_limits().limit_s(seconds)) as stdin:
        for frame in _frames(segments):
            stdin.write(frame.tobytes())
    return path


def select(source: Path, dataset: str, workspace: Workspace, overrides: dict | None = None,
           end_s: float | None = None):
    """The video stages and run_select on one candidate (the cache shares the heavy stages between calls)."""
    settings = load_settings("tiny", overrides)
    candidate = Candidate(candidate_id=source.stem, source=str(source), dataset=dataset, end_s=end_s)
    job, outcomes = run_clip_stages(candidate, settings, workspace)
    assert job.rejection is None, job.rejection
    return outcomes


# ---------------------------------------------------------------- units: the rules on known numbers


def test_content_score_is_zero_for_a_repeat_and_high_for_a_hard_cut():
    frames = list(_frames([(0.1, "blue", 1.0, 0), (0.1, "amber", 1.0, 40)]))
    first, second, cut = (hsv_frame(frame, 256) for frame in (frames[0], frames[1], frames[-1]))
    assert content_score(first, first) == 0.0
    assert content_score(first, second) < 5  # the 4 px drift of the face within a shot
    assert content_score(first, cut) >= 27  # PySceneDetect's default threshold


def test_the_frame_quality_meter_scores_exactly_as_pyscenedetect_s_figure(tmp_path):
    """The meter's uint8 OpenCV path (inside standardise's decode) gives content_score's int16 figure, bit for bit,
    also for the extremes (0 against 255, hue 0 against 179) and random pictures; frame 0 scores 0."""
    from preprocess.run.settings import FrameQualitySettings
    from preprocess.video.frame_quality import FrameQualityMeter

    rng = np.random.default_rng(7)
    frames = [*_frames([(0.1, "blue", 1.0, 0), (0.1, "amber", 1.3, 40)]),
              rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8), np.zeros((HEIGHT, WIDTH, 3), np.uint8),
              np.full((HEIGHT, WIDTH, 3), 255, np.uint8), np.zeros((HEIGHT, WIDTH, 3), np.uint8)]
    frames[-1][..., 0] = 255  # pure red: hue 0, next to the random picture's hues up to 179
    settings = FrameQualitySettings()
    meter = FrameQualityMeter(CLIP_FPS, settings)
    for frame in frames:
        meter.add(frame, None)
    hsv = [hsv_frame(frame, settings.analysis_size) for frame in frames]
    expected = [0.0] + [content_score(previous, current) for previous, current in zip(hsv, hsv[1:], strict=False)]
    quality = meter.save(tmp_path)
    np.testing.assert_array_equal(np.load(tmp_path / quality.content_scores), np.asarray(expected, np.float32))
    assert max(expected) > 100  # the extremes were exercised


def test_find_cuts_applies_threshold_and_min_shot_length():
    scores = np.zeros(100)
    scores[[10, 20, 30, 50]] = [40, 26.9, 27.0, 60]
    assert find_cuts(scores, 27.0, 15) == [10, 30, 50]
    scores[35] = 90  # 5 frames after the cut at 30: a flash, not a new shot
    assert find_cuts(scores, 27.0, 15) == [10, 30, 50]
    assert find_cuts(scores, 27.0, 1) == [10, 30, 35, 50]
    assert find_cuts(np.full(5, 100.0), 27.0, 1)[0] == 1  # frame 0 has no previous frame: never a cut


def test_plan_pieces_never_spans_a_cut_and_splits_long_shots():
    # 60 s at 25 fps, cuts at 10 s and 12 s; max 20 s: the 48 s shot becomes three 16 s pieces
    pieces = plan_pieces(1500, 25, 20.0, [250, 300])
    assert pieces == [(0, 250), (250, 300), (300, 700), (700, 1100), (1100, 1500)]
    for start, end in pieces:
        assert not any(start < cut < end for cut in (250, 300))
    assert plan_pieces(1500, 25, 20.0) == plan_pieces(1500, 25, 20.0, [])  # no cuts: as before
    assert plan_pieces(0, 25, 20.0, [5]) == [(0, 0)]


def _stats(**values) -> PieceStats:
    base = dict(duration_s=5.0, face_frames_fraction=1.0, yaw_mean=0.0, yaw_abs_p95=5.0, pitch_mean=0.0,
                roll_mean=0.0, side_profile_fraction=0.0, multi_face_fraction=0.0, max_faces=1, face_px_median=100.0)
    return PieceStats(**{**base, **values})


def test_blurry_and_identity_change_do_not_reject_by_default():
    default = load_settings("tiny").filters
    assert judge_piece(_stats(sharpness=0.5, identity_change=0.01), default) is None
    # identity_change records only until its threshold is calibrated (issue 22)
    assert judge_piece(_stats(sharpness=0.5, identity_change=0.2), default) is None
    asked = load_settings("tiny", {"filters": {"reject_identity_change": True}}).filters
    rejection = judge_piece(_stats(sharpness=0.5, identity_change=0.2), asked)
    assert rejection.reason == "identity_change" and "0.200 > 0.08" in rejection.detail
    strict = load_settings("tiny", {"filters": {"min_sharpness": 20.0, "max_identity_change": None}}).filters
    rejection = judge_piece(_stats(sharpness=7.5, identity_change=0.2), strict)
    assert rejection.reason == "blurry" and "7.5 < 20.0" in rejection.detail
    assert judge_piece(_stats(sharpness=None, identity_change=None), strict) is None  # not measured: not judged


def test_identity_score_needs_a_second_face_in_enough_windows():
    model = LandmarkGeometry()
    rng = np.random.default_rng(0)
    face = rng.uniform(0.3, 0.7, (478, 3))
    other = face * np.array([1.3, 1.0, 1.0])  # wider: different proportions
    one = np.stack([face + rng.normal(0, 1e-4, face.shape) for _ in range(200)])
    assert identity_change(model, one, 10, 80, 3) < 0.01
    mixed = one.copy()
    mixed[100:] = other
    assert identity_change(model, mixed, 10, 80, 3) > load_settings("tiny").filters.max_identity_change
    blip = one.copy()
    blip[:10] = other  # one window of twenty: a glitch, not a second person
    assert identity_change(model, blip, 10, 80, 3) < 0.01
    assert identity_change(model, np.full((200, 478, 3), np.nan), 10, 80, 3) is None


# ---------------------------------------------------------------- through the real video stages and run_select

# 5 s | 2 s | 5 s, each shot a different background and framing of the same face: cuts at 5 s and 7 s, i.e.
# frames 125 and 175 of the 25 fps standardised clip
SHOTS = [(5.0, "blue", 1.0, 0), (2.0, "amber", 1.0, 30), (5.0, "green", 1.0, -20)]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("shots")
    return {
        "workspace": Workspace(root / "out"),
        "cuts": write_video(root / "cuts.mp4", SHOTS),
        "cuts_blurred": write_video(root / "cuts_blurred.mp4", SHOTS, blur_sigma=3.0),
        # the astronaut and her 1.3x wider double, alternating every second in front of the same background
        "alternating": write_video(root / "alternating.mp4",
                                   [(1.0, "blue", 1.0 if second % 2 == 0 else 1.3, 0) for second in range(8)]),
    }


def test_pieces_do_not_span_hard_cuts(media):
    outcomes = select(media["cuts"], "folder", media["workspace"])
    assert [outcome.frames for outcome in outcomes] == [(0, 125), (125, 175), (175, 300)]
    assert [outcome.rejection.reason if outcome.rejection else None for outcome in outcomes] == [
        None, "too_short", None]
    assert [(outcome.stats.n_shot_cuts, outcome.stats.shot_index) for outcome in outcomes] == [(2, 0), (2, 1), (2, 2)]
    assert all(Path(outcome.files_dir, "clip.mp4").is_file() for outcome in outcomes if outcome.kept)
    # the content scores themselves: far above PySceneDetect's 27 at the cuts, far below it inside the shots
    work = media["workspace"].out_dir / "work"
    scores = np.load(next(work.rglob("content_scores.npy")))
    inside = np.delete(scores, [125, 175])
    assert scores[125] > 40 and scores[175] > 40 and inside.max() < 27, (scores[[125, 175]], inside.max())

    # HDTF is split at the cuts like every dataset (issue 22)
    assert [outcome.frames for outcome in select(media["cuts"], "hdtf", media["workspace"])] == [
        (0, 125), (125, 175), (175, 300)]
    # a dataset left out of shots.datasets: one piece over the whole clip, its cuts still counted
    (whole,) = select(media["cuts"], "hdtf", media["workspace"], {"filters": {"shots": {"datasets": ["folder"]}}})
    assert whole.frames == (0, 300) and whole.stats.n_shot_cuts == 2 and whole.stats.shot_index is None
    # and the same face in three framings is one identity
    assert whole.rejection is None and whole.stats.identity_change < 0.05


def test_a_blurred_copy_is_much_less_sharp_and_rejected_blurry_when_asked(media):
    sharp = select(media["cuts"], "folder", media["workspace"])[0]  # the first shot, 0-5 s
    (blurred,) = select(media["cuts_blurred"], "folder", media["workspace"], end_s=5.0)
    assert blurred.frames == sharp.frames == (0, 125)
    assert sharp.stats.sharpness > 10 * blurred.stats.sharpness, (sharp.stats.sharpness, blurred.stats.sharpness)
    assert blurred.kept  # the threshold is off by default
    threshold = {"filters": {"min_sharpness": 30.0}}
    (judged,) = select(media["cuts_blurred"], "folder", media["workspace"], threshold, end_s=5.0)
    assert judged.rejection.reason == "blurry" and not judged.kept
    assert select(media["cuts"], "folder", media["workspace"], threshold)[0].kept


def test_two_faces_shown_alternately_are_rejected_identity_change_when_asked(media):
    # not split at the face switches (which the content score takes for cuts here): a miss of the shot detector
    unsplit = {"shots": {"datasets": []}}
    (recorded,) = select(media["alternating"], "hdtf", media["workspace"], {"filters": unsplit})
    assert recorded.rejection is None and recorded.stats.identity_change > 0.1  # by default: recorded only
    (outcome,) = select(media["alternating"], "hdtf", media["workspace"],
                        {"filters": {**unsplit, "reject_identity_change": True}})
    assert outcome.rejection.reason == "identity_change", outcome.rejection
    assert outcome.stats.identity_change > 0.1
    assert outcome.stats.face_frames_fraction > 0.95  # the face mesh followed both faces: only identity catches it


def test_the_new_figures_reach_the_clips_table(media):
    import pyarrow as pa

    from preprocess.run.outputs import clip_row
    from shards.tables import CLIPS_SCHEMA

    outcomes = select(media["cuts"], "folder", media["workspace"])
    table = pa.Table.from_pylist([clip_row(outcome, load_settings("tiny"), {}) for outcome in outcomes],
                                 schema=CLIPS_SCHEMA)
    rows = table.select(["n_shot_cuts", "shot_index", "sharpness", "identity_change", "frame_quality_s"]).to_pylist()
    assert [(row["n_shot_cuts"], row["shot_index"]) for row in rows] == [(2, 0), (2, 1), (2, 2)]
    assert all(row["sharpness"] > 50 and row["identity_change"] < 0.05 and row["frame_quality_s"] >= 0
               for row in rows)

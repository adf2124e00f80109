"""Issue 14 items 3 and 4 (speaker size): a crop that follows the face, and speakers counted by size.

Generated scenes (the astronaut's head and shoulders pasted on a background, espeak-ng speech) go through the
pipeline's own stages (``start_job`` ... ``run_select``) with real ffmpeg, MediaPipe and Silero VAD; the kept
pieces are then checked with MediaPipe's detector and mesh on their 512x512 frames.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from preprocess.pipeline import (
    Workspace,
    run_clip_stages,
)
from preprocess.run.media import feed_stdin, iter_rgb_frames, media_limits
from preprocess.run.records import Candidate, CropBox
from preprocess.run.settings import load_settings
from preprocess.video.crop import CropTrack, choose_crop, face_track
from preprocess.video.face_models import detect_faces, mesh_landmarks, new_face_mesh
from preprocess.video.locate import FaceSurvey, count_speakers
from preprocess.video.standardise import VIDEO_FILE
from synchrorama.sample_data import _background, _head_and_shoulders, _resized, make_talking_video, speech_wav

SETTINGS = load_settings("tiny")
FPS = 25
# The astronaut's face (landmark extent) is about this share of the pasted head-and-shoulders patch's height.
FACE_SHARE = 0.37


def write_scene(path: Path, width: int, height: int, seconds: float, faces) -> Path:
    """An H.264/AAC mp4 at 25 fps of head-and-shoulders patches over a background, with looping espeak speech.
    ``faces``: (patch height px, function t -> (x, y) of the patch's top-left corner) per face."""
    patches = [(_resized(_head_and_shoulders(), patch_height), place) for patch_height, place in faces]
    background = _background(width, height)
    n_frames = int(round(seconds * FPS))
    speech = speech_wav(path.with_suffix(".speech.wav"))
    command = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{width}x{height}", "-r", str(FPS), "-i", "-", "-stream_loop", "-1", "-i", str(speech),
               "-map", "0:v", "-map", "1:a", "-c:a", "aac", "-b:a", "64k", "-c:v", "libx264", "-preset", "ultrafast",
               "-crf", "20", "-pix_fmt", "yuv420p", "-t", f"{seconds:.3f}", str(path)]
    with feed_stdin(command, purpose=f"writing {path}", timeout_s=media_limits().limit_s(seconds)) as stdin:
        for index in range(n_frames):
            frame = background.copy()
            for patch, place in patches:
                x, y = (int(round(value)) for value in place(index / FPS))
                frame[y:y + patch.shape[0], x:x + patch.shape[1]] = patch
            stdin.write(frame.tobytes())
    return path


def run_stages(path: Path, out_dir: Path, candidate_id: str):
    """The per-clip stages up to filter-and-split: (job after faces, piece outcomes)."""
    return run_clip_stages(Candidate(candidate_id, str(path), "folder"), SETTINGS, Workspace(out_dir))


# ------------------------------------------------------------------ the track on its own (no media)


def _survey(times, boxes) -> FaceSurvey:
    heights = tuple(box[3] if box else 0.0 for box in boxes)
    return FaceSurvey(tuple(times), tuple(1 for _ in times), heights, CropBox(0, 0, 100, 100), "landmarks",
                      tuple(boxes), tuple(1 for _ in times))


def test_track_follows_a_steady_drift_exactly_and_bounds_a_jump():
    settings = SETTINGS.locate
    times = [index / 2 for index in range(61)]  # 30 s at 2 samples per second
    drift = [(100 + 30 * t, 200, 100, 100) for t in times]  # 30 px/s, 0.1 sides per second of a 300 px crop
    track = face_track(_survey(times, drift), 300, 1280, 720, FPS, 750, settings)
    expected_x = np.round(150 + 30 * np.arange(750) / FPS - 150)
    assert np.abs(np.array(track.xs) - expected_x).max() <= 1  # smoothing keeps a steady drift, even at the ends
    assert set(track.ys) == {100} and track.side == 300 and track.fps == FPS
    assert track.max_speed == pytest.approx(0.1, abs=0.01)

    # a face that jumps 600 px (a detection on someone else, a cut): the crop glides at the bounded speed
    jump = [(100 if t < 15 else 700, 200, 100, 100) for t in times]
    track = face_track(_survey(times, jump), 300, 1280, 720, FPS, 750, settings)
    assert track.max_speed <= settings.max_crop_speed + 1e-6
    steps = np.abs(np.diff(track.xs))
    assert steps.max() <= np.ceil(settings.max_crop_speed * 300 / FPS) + 1
    assert track.xs[0] == 0 and track.xs[-1] == 600  # 750 - 150 = 600: arrives, centred on the face
    # and never leaves the frame
    near_edge = [(1250, 650, 60, 60) for _ in times]
    track = face_track(_survey(times, near_edge), 300, 1280, 720, FPS, 100, settings)
    assert max(track.xs) + 300 <= 1280 and max(track.ys) + 300 <= 720


def test_an_annotated_box_stays_unless_the_face_leaves_it(tmp_path):
    probe = SimpleNamespace(width=1280, height=720)  # the crop reads only the frame size of the probe
    candidate = Candidate("c", str(tmp_path / "v.mp4"), "hdtf", annotated_box=CropBox(400, 100, 400, 400), annotated_height=720)
    times = [index / 2 for index in range(20)]
    inside = [(500 + 5 * t, 200, 150, 160) for t in times]
    choice = choose_crop(candidate, probe, _survey(times, inside), SETTINGS.locate, FPS, 250)
    assert (choice.method, choice.track, choice.box) == ("annotated", None, CropBox(400, 100, 400, 400))
    leaving = [(500 + 60 * t, 200, 150, 160) for t in times]  # walks out to the right
    choice = choose_crop(candidate, probe, _survey(times, leaving), SETTINGS.locate, FPS, 250)
    assert choice.method == "track" and "face_left_annotated_box" in choice.notes
    assert isinstance(choice.track, CropTrack) and choice.track.xs[-1] > choice.track.xs[0] + 300
    fixed = load_settings("tiny", {"locate": {"follow_face": False}}).locate
    assert choose_crop(candidate, probe, _survey(times, leaving), fixed, FPS, 250).method == "annotated"


def test_only_speaker_size_faces_count():
    assert count_speakers([240.0, 82.0], 0.5, 64.0) == 1  # a portrait behind the speaker
    assert count_speakers([240.0, 230.0], 0.5, 64.0) == 2  # a second speaker
    assert count_speakers([240.0, 82.0], 0.3, 64.0) == 2  # a looser fraction counts it
    assert count_speakers([240.0, 82.0], 0.3, 100.0) == 1  # ... unless it is under min_face_px
    assert count_speakers([50.0, 50.0], 0.5, 64.0) == 0 and count_speakers([], 0.5, 64.0) == 0


# ------------------------------------------------------------------ generated media through the stages


@pytest.fixture(scope="module")
def drifting_face(tmp_path_factory):
    """30 s of 1280x720: a face (about 130 px) drifting from the left edge to the right edge at constant speed."""
    root = tmp_path_factory.mktemp("drift")
    patch = 360
    video = write_scene(root / "drift.mp4", 1280, 720, 30.0,
                        [(patch, lambda t: (20 + (1280 - patch - 40) * t / 30.0, 180))])
    job, outcomes = run_stages(video, root / "out", "drift")
    return job, outcomes


def test_a_face_drifting_across_the_frame_stays_inside_every_piece(drifting_face):
    job, outcomes = drifting_face
    assert job.rejection is None, job.rejection
    assert job.crop_method == "track" and 0.05 < job.crop_max_speed <= SETTINGS.locate.max_crop_speed
    # a fixed box could not hold it: the face travels more than three crop sides
    centres = [box[0] + box[2] / 2 for box in job.survey.face_boxes if box]
    assert max(centres) - min(centres) > 3 * job.crop_box.w
    assert len(outcomes) == 2 and all(outcome.kept for outcome in outcomes), [o.rejection for o in outcomes]
    margin = 0.04 * 512
    mesh = new_face_mesh(video_mode=False, refine_landmarks=False)
    try:
        for outcome in outcomes:
            checked, detected = 0, 0
            frames = iter_rgb_frames(Path(outcome.files_dir) / VIDEO_FILE, width=512, height=512, fps=2)
            for index, frame in enumerate(frames):
                # every landmark of the face inside the frame with a margin: the whole face is in the crop
                landmarks = mesh_landmarks(mesh, frame)
                assert landmarks is not None, (outcome.clip_id, index)
                points = landmarks[:, :2] * 512
                assert points.min() >= margin and points.max() <= 512 - margin, (outcome.clip_id, index, points)
                checked += 1
                # the detector's box too, where it answers (full-range BlazeFace misses a close-up now and then)
                faces = detect_faces(frame, 0.5)
                assert len(faces) <= 1, (outcome.clip_id, index, faces)
                for x, y, w, h, _ in faces:
                    assert margin <= x and x + w <= 512 - margin and margin <= y and y + h <= 512 - margin, \
                        (outcome.clip_id, index, faces)
                    detected += 1
            assert checked >= 2 * 14, (outcome.clip_id, checked)  # 15 s pieces, 2 samples per second
            assert detected >= 0.8 * checked, (outcome.clip_id, detected, checked)
    finally:
        mesh.close()


def test_a_small_face_in_the_background_is_kept_two_equal_faces_are_not(tmp_path):
    # the speaker's face about 240 px high; a portrait in the background about 100 px (0.4 of it, over
    # min_face_px: only its size relative to the speaker's keeps it from counting)
    video = write_scene(tmp_path / "portrait.mp4", 1280, 720, 5.0,
                        [(648, lambda t: (150, 40)), (300, lambda t: (950, 60))])
    job, outcomes = run_stages(video, tmp_path / "out", "portrait")
    survey = job.survey
    # the premise: the detector does see the portrait, the speaker count does not include it
    assert np.mean(np.array(survey.detected_counts) == 2) >= 0.8, survey.detected_counts
    assert set(survey.face_counts) == {1}, survey.face_counts
    assert [outcome.kept for outcome in outcomes] == [True], [outcome.rejection for outcome in outcomes]
    assert outcomes[0].stats.max_faces == 1 and outcomes[0].stats.multi_face_fraction == 0.0

    pair = make_talking_video(tmp_path / "pair.mp4", layout="pair", seconds=5.0)
    job, outcomes = run_stages(pair, tmp_path / "out", "pair")
    assert set(job.survey.face_counts) == {2}, job.survey.face_counts
    assert [outcome.rejection.reason for outcome in outcomes] == ["multi_speaker"]

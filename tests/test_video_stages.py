"""Unit tests of the video stages on generated media: pose, splitting, crop boxes, standardise, faces."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pyloudnorm
import pytest
import soundfile

from preprocess.datasets.video_files import folder_candidates
from preprocess.pipeline import (
    Workspace,
    run_select,
    run_stage,
    start_job,
)
from preprocess.run.cache import StageCache
from preprocess.run.media import iter_rgb_frames, run_ffmpeg
from preprocess.run.records import Candidate, CropBox
from preprocess.run.settings import load_settings
from preprocess.video.crop import choose_crop_box
from preprocess.video.face_models import mesh_landmarks, new_face_mesh
from preprocess.video.faces import track_faces
from preprocess.video.filters import judge_piece, piece_stats, plan_pieces
from preprocess.video.frame_quality import CONTENT_SCORES_FILE, SHARPNESS_FILE
from preprocess.video.head_pose import head_pose_from_landmarks, rotation_matrix
from preprocess.video.locate import FaceSurvey, survey_faces
from preprocess.video.probe import probe_video
from preprocess.video.standardise import standardise_clip

SETTINGS = load_settings("tiny")


def _ffprobe(path):
    out = subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-of", "json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["streams"]


def test_head_pose_recovers_known_rotations():
    import cv2
    from skimage import data

    face = cv2.resize(np.ascontiguousarray(data.astronaut()[0:300, 80:380]), (512, 512))
    landmarks = mesh_landmarks(new_face_mesh(video_mode=False, refine_landmarks=True), face)
    assert landmarks is not None and landmarks.shape == (478, 3)
    # camera coordinates (x right, y up, z to viewer), centred on the face
    points = landmarks.astype(np.float64) * [1, -1, -1]
    centre = points.mean(axis=0)
    measured = head_pose_from_landmarks(landmarks[None])[0]
    frontal = (points - centre) @ rotation_matrix(*measured)  # undo the photo's own pose
    for yaw, pitch, roll in [(0, 0, 0), (30, 0, 0), (-60, 0, 0), (0, 20, 0), (0, 0, -15), (40, -10, 8)]:
        turned = frontal @ rotation_matrix(yaw, pitch, roll).T + centre
        estimate = head_pose_from_landmarks((turned * [1, -1, -1])[None])[0]
        np.testing.assert_allclose(estimate, [yaw, pitch, roll], atol=0.5)
    nan_rows = np.full((2, 478, 3), np.nan)
    assert np.isnan(head_pose_from_landmarks(nan_rows)).all()


@pytest.mark.parametrize("seconds", [3.0, 19.96, 20.0, 20.04, 45.0, 61.0, 400.0])
def test_plan_pieces_covers_the_clip_in_pieces_of_3_to_20_seconds(seconds):
    n_frames = int(round(seconds * 25))
    pieces = plan_pieces(n_frames, 25, 20.0)
    assert pieces[0][0] == 0 and pieces[-1][1] == n_frames
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:], strict=False))
    lengths = [(end - start) / 25 for start, end in pieces]
    assert all(3.0 <= length <= 20.0 for length in lengths), lengths
    assert max(lengths) - min(lengths) <= 0.04 + 1e-9
    if seconds == 45.0:
        assert lengths == [15.0, 15.0, 15.0]


def _probe(path):
    result = probe_video(path)
    assert not hasattr(result, "reason"), result
    return result


def test_annotated_box_is_scaled_squared_and_moved_inside_the_frame(frontal_video):
    probe = _probe(frontal_video)  # 640x360
    survey = FaceSurvey((0.0,), (1,), (80.0,), CropBox(280, 100, 80, 90), "landmarks")
    candidate = Candidate("c", str(frontal_video), "hdtf", annotated_box=CropBox(1000, 40, 400, 380),
                          annotated_height=720)
    box, method, notes = choose_crop_box(candidate, probe, survey, SETTINGS.locate)
    assert method == "annotated"
    assert box.w == box.h == 200  # 400 px at 720p -> 200 px at 360p, made square
    assert box.x + box.w <= 640 and box.y >= 0
    assert "crop_box_moved_inside_frame" in notes and "crop_box_made_square" in notes
    # resolution 0: the annotated box cannot be scaled, so the face decides
    no_height = Candidate("c", str(frontal_video), "hdtf", annotated_box=CropBox(10, 10, 100, 100),
                          crop_ratio=1.2)
    box, method, notes = choose_crop_box(no_height, probe, survey, SETTINGS.locate)
    assert method == "landmarks" and "annotated_box_without_resolution" in notes
    assert box.w == pytest.approx(int(1.8 * 1.2 * 90) // 2 * 2)


def test_survey_counts_one_face_and_two_side_by_side(frontal_video, pair_video):
    for video, expected in [(frontal_video, 1), (pair_video, 2)]:
        probe = _probe(video)
        survey = survey_faces(str(video), probe, 0.0, 3.0, SETTINGS.locate)
        assert len(survey.face_counts) == 6  # 3 s at 2 samples per second
        assert all(count == expected for count in survey.face_counts), survey.face_counts
        assert survey.face_box is not None and min(survey.face_heights_px) > 64


def test_standardise_and_faces_give_the_training_format(frontal_video, tmp_path):
    probe = _probe(frontal_video)
    survey = survey_faces(str(frontal_video), probe, 0.5, 4.0, SETTINGS.locate)
    box, _, _ = choose_crop_box(Candidate("c", str(frontal_video), "folder"), probe, survey, SETTINGS.locate)
    clip = standardise_clip(str(frontal_video), 0.5, 4.0, box, SETTINGS.standardise, tmp_path)
    assert clip.n_frames == 100
    video_stream, = _ffprobe(tmp_path / clip.video)
    assert (video_stream["width"], video_stream["height"], video_stream["codec_name"]) == (512, 512, "h264")
    assert video_stream["avg_frame_rate"] == "25/1" and video_stream["pix_fmt"] == "yuv420p"
    audio, rate = soundfile.read(tmp_path / clip.audio)
    assert rate == 16000 and audio.ndim == 1 and len(audio) == clip.n_frames * 640
    assert pyloudnorm.Meter(rate).integrated_loudness(audio) == pytest.approx(-23.0, abs=1.0)

    track = track_faces(tmp_path / clip.video, 512, SETTINGS.faces, tmp_path)
    landmarks, pose = np.load(tmp_path / track.landmarks), np.load(tmp_path / track.pose)
    assert landmarks.shape == (100, 478, 3) and pose.shape == (100, 3)
    assert not np.isnan(pose).any()
    stats = piece_stats(pose, survey, (0, 100), 25, SETTINGS.filters)
    assert stats.face_frames_fraction == 1.0 and abs(stats.yaw_mean) < 20
    assert judge_piece(stats, SETTINGS.filters) is None
    strict = load_settings("tiny", {"filters": {"max_abs_yaw_deg": 0.01}}).filters
    assert judge_piece(piece_stats(pose, survey, (0, 100), 25, strict), strict).reason == "side_profile"


def test_cache_keeps_nothing_from_a_crashed_computation(tmp_path):
    cache = StageCache(tmp_path)

    def crash(out_dir):
        (out_dir / "partial.bin").write_bytes(b"x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cache.run("stage", "key1", crash)
    assert cache.load("stage", "key1") is None and not any((tmp_path / "stage").iterdir())
    result, cached = cache.run("stage", "key1", lambda out_dir: {"value": 1})
    assert (result["value"], cached) == (1, False)
    assert cache.run("stage", "key1", lambda out_dir: {"value": 2})[0]["value"] == 1


@pytest.mark.parametrize("variant", [
    {"rotation": 90, "width": 320, "height": 180},
    {"vfr": True},
    {"pix_fmt": "yuv420p10le"},
    {"pix_fmt": "yuv444p", "width": 321, "height": 241},
    {"extra_audio_track": True},
    {"fps": 60, "sample_rate": 48000},
], ids=["rotated", "vfr", "10bit", "odd-size", "extra-tracks", "60fps-48k"])
def test_standardise_normalises_awkward_inputs(variant, tmp_path):
    from media_fixtures import make_test_video

    source = make_test_video(tmp_path / "in.mp4", seconds=2.0, **{"width": 320, "height": 240, **variant})
    probe = _probe(source)
    side = min(probe.width, probe.height) // 2 * 2
    box = CropBox(0, 0, side, side)
    consumed = []  # the face mesh's view: one frame per encoded frame, whatever the source's oddities
    clip = standardise_clip(str(source), 0.0, 2.0, box, SETTINGS.standardise, tmp_path,
                            frame_consumer=lambda frame: consumed.append(frame.shape))
    assert len(consumed) == clip.n_frames and set(consumed) == {(512, 512, 3)}
    stream, = _ffprobe(tmp_path / clip.video)
    assert (stream["width"], stream["height"], stream["avg_frame_rate"], stream["pix_fmt"]) == (512, 512, "25/1", "yuv420p")
    assert abs(clip.n_frames - 50) <= 1  # a VFR source's last frame may end just short of 2.0 s
    audio, rate = soundfile.read(tmp_path / clip.audio)
    assert rate == 16000 and audio.ndim == 1 and len(audio) == clip.n_frames * 640
    if variant.get("rotation"):
        assert (probe.width, probe.height) == (180, 320)  # displayed portrait: the crop box is in displayed pixels


def _shifted(source, shift: str, out):
    """``source`` remuxed with one stream delayed by 1 s (``shift``: "audio" or "video"), as downloads often are."""
    late, early = ("1", "0") if shift == "audio" else ("0", "1")
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(source), "-itsoffset", "1", "-i", str(source),
                    "-map", f"{early}:v", "-map", f"{late}:a", "-c", "copy", str(out)], check=True)
    return out


def test_streams_that_start_apart_stay_aligned_with_the_picture(tmp_path):
    from media_fixtures import make_test_video

    source = make_test_video(tmp_path / "in.mp4", seconds=3.0, width=320, height=240)
    box = CropBox(0, 0, 240, 240)
    rms = lambda a: float(np.sqrt(np.mean(np.square(a))))  # noqa: E731

    # audio that starts 1 s after the picture: the first second is silence, not the tone pulled forward
    (tmp_path / "a").mkdir()
    clip = standardise_clip(str(_shifted(source, "audio", tmp_path / "late_audio.mp4")), 0.0, 3.0, box,
                            SETTINGS.standardise, tmp_path / "a")
    audio, rate = soundfile.read(tmp_path / "a" / clip.audio)
    assert len(audio) == clip.n_frames * 640
    assert rms(audio[: int(0.9 * rate)]) < 1e-4 < 1e-2 < rms(audio[int(1.1 * rate): int(2.8 * rate)])

    # a picture that starts 1 s after the audio: its first frame is held for that second
    (tmp_path / "v").mkdir()
    consumed = []
    clip = standardise_clip(str(_shifted(source, "video", tmp_path / "late_video.mp4")), 0.0, 3.0, box,
                            SETTINGS.standardise, tmp_path / "v",
                            frame_consumer=lambda frame: consumed.append(frame.mean(axis=2)))
    import av

    with av.open(str(tmp_path / "v" / clip.video)) as container:
        frames = [f.to_ndarray(format="gray").astype(float) for f in container.decode(video=0)]
    change = lambda i, j: float(np.abs(frames[i] - frames[j]).mean())  # noqa: E731
    assert change(0, 22) < 1.0 < 5.0 < change(30, 55), (change(0, 22), change(30, 55))
    # the frames the face mesh got are the clip's, the held first second included
    assert len(consumed) == len(frames) == clip.n_frames
    seen = lambda i, j: float(np.abs(consumed[i] - consumed[j]).mean())  # noqa: E731
    assert seen(0, 22) < 1.0 < 5.0 < seen(30, 55), (seen(0, 22), seen(30, 55))
    audio, rate = soundfile.read(tmp_path / "v" / clip.audio)
    assert rms(audio[: int(0.9 * rate)]) > 1e-2  # the tone is there from the start


def test_a_folder_dataset_finds_every_common_video_container_and_nothing_else(tmp_path):
    from preprocess.datasets.video_files import folder_candidates

    names = ["a.mp4", "a.avi", "b.flv", "c.ts", "d.M4V", "e.mpg", "sub/f.wmv", "sub/g.3gp", "notes.txt",
             "speech.wav", ".hidden.mp4"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    candidates = folder_candidates(tmp_path)
    assert sorted(Path(c.source).relative_to(tmp_path).as_posix() for c in candidates) == sorted(
        ["a.mp4", "a.avi", "b.flv", "c.ts", "d.M4V", "e.mpg", "sub/f.wmv", "sub/g.3gp"])
    ids = [c.candidate_id for c in candidates]
    assert len(set(ids)) == len(ids) and "sub__f" in ids


# ---------------------------------------------------------------- one decode for the encode and the face mesh


def test_the_face_mesh_sees_the_clips_own_frames_in_order(tmp_path):
    """A source whose every frame differs (testsrc's moving pattern and counter, 30 fps -> 25 fps): the frame the
    consumer got at index f is the decoded clip's frame f (closer to it than to any other frame), and the clip is
    the bytes the encode alone writes."""
    source = tmp_path / "pattern.mp4"
    run_ffmpeg(["-f", "lavfi", "-i", "testsrc=size=640x360:rate=30:duration=2", "-f", "lavfi", "-i",
                "sine=duration=2", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac",
                "-shortest", source], purpose="writing the pattern source")
    box = CropBox(100.0, 20.0, 320.0, 320.0)
    (tmp_path / "alone").mkdir()
    (tmp_path / "streamed").mkdir()
    alone = standardise_clip(str(source), 0.3, 1.5, box, SETTINGS.standardise, tmp_path / "alone")
    consumed = []
    streamed = standardise_clip(str(source), 0.3, 1.5, box, SETTINGS.standardise, tmp_path / "streamed",
                                frame_consumer=lambda frame: consumed.append(frame.astype(np.int16)))
    assert (tmp_path / "streamed" / "clip.mp4").read_bytes() == (tmp_path / "alone" / "clip.mp4").read_bytes()
    assert streamed == alone
    decoded = np.stack(list(iter_rgb_frames(tmp_path / "streamed" / "clip.mp4", width=512, height=512)))
    assert len(consumed) == len(decoded) == streamed.n_frames >= 37
    for index, frame in enumerate(consumed):
        distances = np.abs(decoded.astype(np.int16) - frame).mean(axis=(1, 2, 3))
        assert int(np.argmin(distances)) == index
        assert distances[index] < 3.0  # only x264's CRF 18 loss between the two


@pytest.mark.timeout(300)
def test_face_landmarks_come_from_standardise_s_decode_and_match_a_second_decode(frontal_video, tmp_path):
    """The faces stage picks up the landmarks the face mesh made inside standardise (hard links, no second copy); they
    match, frame for frame, the landmarks of a second decode of clip.mp4 (the two-decode design) up to x264's
    loss; frame quality is there for every frame too."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "frontal.mp4").symlink_to(frontal_video)
    workspace = Workspace(tmp_path / "out")
    job = start_job(folder_candidates(raw)[0], workspace)
    for stage in ("probe", "locate", "standardise", "faces"):
        job = run_stage(stage, job, SETTINGS, workspace)
    assert job.rejection is None, job.rejection
    clip_dir = workspace.cache.entry_dir("standardise", job.standardise_key)
    faces_dir = workspace.cache.entry_dir("faces", job.faces_key)
    n_frames = job.standardised.n_frames
    assert job.faces.n_frames == n_frames == 125
    for name in (job.faces.landmarks, job.faces.pose):
        assert (faces_dir / name).stat().st_ino == (clip_dir / name).stat().st_ino  # linked, not copied
    landmarks = np.load(faces_dir / job.faces.landmarks).astype(np.float32)
    assert landmarks.shape == (n_frames, 478, 3)

    again = track_faces(clip_dir / job.standardised.video, 512, SETTINGS.faces, tmp_path)
    second = np.load(tmp_path / again.landmarks).astype(np.float32)
    assert second.shape == landmarks.shape and np.isfinite(second).all() and np.isfinite(landmarks).all()
    pixels = np.abs(second[..., :2] - landmarks[..., :2]) * 512
    assert np.median(pixels) < 0.5 and pixels.mean(axis=(1, 2)).max() < 2.0, (np.median(pixels), pixels.max())

    [piece] = run_select(job, SETTINGS, workspace)
    assert piece.kept, piece.rejection
    quality = next(timing for timing in piece.job.timings if timing.stage == "frame_quality")
    assert not quality.cached
    scores, sharpness = np.load(clip_dir / CONTENT_SCORES_FILE), np.load(clip_dir / SHARPNESS_FILE)
    assert scores.shape == sharpness.shape == (n_frames,) and np.isfinite(sharpness[::5]).all()

"""VFHQ's meta-info files and MEAD's subject folders, in their real formats with their traps: the readers turn them
into the right candidates and issues (fast unit tests on placeholder files), each layout runs end to end through the
real flow (one tiny-profile run per dataset), and an empty dataset fails naming what was looked for.

MEAD's point is its separate microphone audio: the generated camera videos carry a silent track and the microphone
files carry espeak-ng speech, so a kept clip whose clip.wav is that speech can only have come from the microphone.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile

from flows.preprocess import preprocess
from preprocess.datasets.discover import discover_candidates
from preprocess.datasets.mead import mead_candidates
from preprocess.datasets.vfhq import LANDMARK_BOX_SCALE, read_frame_landmarks, read_meta_info, vfhq_candidates
from preprocess.run.failures import RunFailed
from preprocess.run.records import CropBox
from preprocess.run.settings import LayoutSettings, load_settings
from preprocess.video.standardise import standardise_clip
from shards.tables import CLIPS_TABLE, TABLES_DIR
from synchrorama.sample_data import make_talking_video, speech_wav

# Where the astronaut's face sits in make_talking_video's 640x360 "single" frames (measured on the generator's
# geometry): eyes, nose tip and mouth corners, and a 200 px crop box around them.
LANDMARKS = np.array([[296, 140], [336, 140], [316, 165], [300, 190], [332, 190]], np.float32)
CROP = (216, 60, 416, 260)


# --------------------------------------------------------------------------------------------- VFHQ layout


def meta_info(video_id: str, frames: range, *, fps: str | None = "25", crop: tuple | None = CROP,
              malformed_at: int | None = None, header_id: str | None = None) -> str:
    """A VFHQ meta-info file: header, per-frame landmark lines, the crop line (their real layout)."""
    lines = [f"Video ID: {header_id or video_id}", "H: 360", "W: 640"]
    if fps is not None:
        lines.append(f"FPS: {fps}")
    lines.append("FRAME INDEX LANDMARKS5 (x1 y1 ... x5 y5)")
    for index in frames:
        if index == malformed_at:
            lines.append(f"{index:08d} 296 140 336")  # a truncated line
            continue
        wobble = np.float32(np.sin(index / 10.0))  # the face moves a little; the median box must not care
        points = LANDMARKS + wobble
        lines.append(f"{index:08d} " + " ".join(f"{value:.2f}" for value in points.ravel()))
    lines.append("")
    if crop is not None:
        lines.append("CROP BBOX (x0 y0 x1 y1): " + " ".join(str(value) for value in crop))
    return "\n".join(lines) + "\n"


def write_vfhq(raw: Path, video_bytes: bytes | None = None) -> Path:
    """The meta_info folder of a small VFHQ copy with its traps; ``video_bytes``: a placeholder for vidA.mp4.

    Names are VFHQ's real ``...+F<first>-<last>.txt`` (one ``F``); the time range is the name's with the public
    readers' trim, ``(first + 1) / FPS`` to ``(last - 1) / FPS``, so F24-126 at 25 fps is 1.00-5.00 s."""
    meta = raw / "meta_info"
    meta.mkdir(parents=True)
    files = {
        "Clip+vidA+P0+C0+F24-126.txt": meta_info("vidA", range(24, 127)),  # kept: 1-5 s
        # the invented F<a>-F<b> form, still read; a malformed frame line and no crop line: the box comes from
        # the per-frame landmarks
        "Clip+vidA+P0+C1+F49-F126.txt": meta_info("vidA", range(49, 127), crop=None, malformed_at=60),
        "Clip+vidB+P0+C0+F24-126.txt": meta_info("vidB", range(24, 127)),  # never downloaded
        "Clip+vidA+P1+C2+F399-501.txt": meta_info("vidA", range(399, 502)),  # beyond the 6 s video
        "Clip+vidA+P0+C3+F24-126.txt": meta_info("vidA", range(24, 127), fps=None),  # no FPS line
        "Clip+vidA+P0+C4+F24-126.txt": meta_info("vidA", range(0, 0), header_id="vidZ"),  # no frames; wrong id
        "Clip+not-a-vfhq-name.txt": "Video ID: x\n",
    }
    for name, text in files.items():
        (meta / name).write_text(text)
    if video_bytes is not None:
        (raw / "vidA.mp4").write_bytes(video_bytes)
    return raw


def test_vfhq_meta_info_parses_into_candidates_and_issues(tmp_path):
    raw = write_vfhq(tmp_path / "vfhq", video_bytes=b"placeholder")
    candidates, issues = vfhq_candidates(raw)
    by_id = {c.candidate_id: c for c in candidates}
    assert sorted(by_id) == ["Clip_not-a-vfhq-name", "vidA_P0_C0", "vidA_P0_C1", "vidA_P0_C3", "vidA_P0_C4",
                             "vidA_P1_C2", "vidB_P0_C0"]
    good = by_id["vidA_P0_C0"]
    assert (good.start_s, good.end_s) == (1.0, 5.0)  # F24-126 at 25 fps, one frame trimmed at each end
    assert good.annotated_box == CropBox(216, 60, 200, 200) and good.annotated_height == 360
    assert good.source == str(raw / "vidA.mp4") and good.reject_reason is None and good.notes == ()
    assert good.annotation_file.endswith("Clip+vidA+P0+C0+F24-126.txt") and good.dataset == "vfhq"

    # the old F<a>-F<b> form; malformed line skipped and recorded; no crop line: the median landmark box
    moved = by_id["vidA_P0_C1"]
    assert (moved.start_s, moved.end_s) == (2.0, 5.0) and moved.reject_reason is None
    assert set(moved.notes) == {"malformed_line", "crop_box_from_landmarks"}
    side = 50 * LANDMARK_BOX_SCALE  # the landmarks span 40 x 50 px
    assert moved.annotated_box.w == pytest.approx(side, abs=1)
    assert moved.annotated_box.x + side / 2 == pytest.approx(316, abs=1)
    assert moved.annotated_box.y + side / 2 == pytest.approx(165, abs=1)
    malformed = [i for i in issues if i.kind == "malformed_line"]
    assert len(malformed) == 1 and malformed[0].subject == "vidA_P0_C1"
    assert malformed[0].line == 5 + (60 - 49) + 1  # 4 header lines + the frame header, then frames 49..59

    assert by_id["vidB_P0_C0"].reject_reason == "missing_source"
    assert "vidB" in by_id["vidB_P0_C0"].reject_detail and "download" in by_id["vidB_P0_C0"].reject_detail
    assert by_id["vidA_P0_C3"].reject_reason == "fps_missing"
    assert by_id["Clip_not-a-vfhq-name"].reject_reason == "bad_file_name"
    # beyond the video's end is the probe stage's verdict (it knows the duration): parsed as annotated here
    assert (by_id["vidA_P1_C2"].start_s, by_id["vidA_P1_C2"].reject_reason) == (16.0, None)
    empty = by_id["vidA_P0_C4"]
    assert {"no_frame_landmarks", "video_id_mismatch"} <= set(empty.notes) and empty.end_s == 5.0
    kinds = {(i.kind, i.subject) for i in issues}
    assert {("bad_file_name", "Clip+not-a-vfhq-name"), ("fps_missing", "vidA_P0_C3"),
            ("no_frame_landmarks", "vidA_P0_C4"), ("video_id_mismatch", "vidA_P0_C4"),
            ("crop_box_from_landmarks", "vidA_P0_C1")} <= kinds
    assert "frame_range_mismatch" not in {i.kind for i in issues}  # every file's frame lines match its name

    indices, landmarks = read_frame_landmarks(good.annotation_file)
    assert indices.tolist() == list(range(24, 127)) and landmarks.shape == (103, 5, 2)
    assert np.allclose(landmarks[0], LANDMARKS + np.sin(2.4), atol=0.01)
    assert read_frame_landmarks(moved.annotation_file)[0].shape == (77,)  # the malformed line is skipped


@pytest.mark.parametrize(("name", "video", "person", "clip", "first", "last"), [
    ("Clip+G0DGRma_p48+P0+C0+F11208-11383", "G0DGRma_p48", 0, 0, 11208, 11383),  # real VFHQ names
    ("Clip+_5rNOD1nsDg+P0+C0+F575-769", "_5rNOD1nsDg", 0, 0, 575, 769),
    ("Clip+-0d4ntONiHE+P2+C13+F100-250", "-0d4ntONiHE", 2, 13, 100, 250),  # an id may start with "-"
    ("Clip+G0DGRma_p48+P1+C3+F11208-F11383", "G0DGRma_p48", 1, 3, 11208, 11383),  # the invented form, still read
])
def test_vfhq_real_meta_info_names_give_the_public_readers_time_range(tmp_path, name, video, person, clip, first,
                                                                      last):
    """The public reader (yunyu/vfhq-downloader vfhq_dl/parse_meta_info.py) cuts (first + 1) / FPS to
    (last - 1) / FPS; the frame lines of a real file run over the name's range and agree with it."""
    (tmp_path / f"{video}.mp4").write_bytes(b"placeholder")
    path = tmp_path / f"{name}.txt"
    path.write_text(meta_info(video, range(first, last + 1)))
    issues = []
    candidate = read_meta_info(path, tmp_path, issues)
    assert candidate.reject_reason is None, candidate.reject_detail
    assert candidate.candidate_id == f"{video}_P{person}_C{clip}"
    assert candidate.source == str(tmp_path / f"{video}.mp4")
    assert (candidate.start_s, candidate.end_s) == (round((first + 1) / 25, 3), round((last - 1) / 25, 3))
    assert candidate.notes == () and issues == []


def test_vfhq_frame_lines_that_disagree_with_the_name_are_recorded_with_both_ranges(tmp_path):
    (tmp_path / "G0DGRma_p48.mp4").write_bytes(b"placeholder")
    path = tmp_path / "Clip+G0DGRma_p48+P0+C0+F11208-11383.txt"
    path.write_text(meta_info("G0DGRma_p48", range(11000, 11100)))  # frames of another clip
    issues = []
    candidate = read_meta_info(path, tmp_path, issues)
    # the name gives the time range, as the public readers take it; the disagreement is a note and an issue row
    assert (candidate.start_s, candidate.end_s) == (448.36, 455.28) and candidate.reject_reason is None
    assert candidate.notes == ("frame_range_mismatch",)
    (mismatch,) = [issue for issue in issues if issue.kind == "frame_range_mismatch"]
    assert mismatch.subject == "G0DGRma_p48_P0_C0" and mismatch.file == path.name
    assert "11000-11099" in mismatch.detail and "11208-11383" in mismatch.detail


def test_vfhq_a_range_with_nothing_left_after_the_trim_is_rejected(tmp_path):
    (tmp_path / "G0DGRma_p48.mp4").write_bytes(b"placeholder")
    path = tmp_path / "Clip+G0DGRma_p48+P0+C0+F100-102.txt"
    path.write_text(meta_info("G0DGRma_p48", range(100, 103)))
    issues = []
    candidate = read_meta_info(path, tmp_path, issues)
    assert candidate.reject_reason == "bad_time_range" and "100-102" in candidate.reject_detail


@pytest.mark.parametrize("name", [
    "Clip+G0DGRma_p48+P0+C0+11208-11383",  # no F
    "Clip+G0DGRma_p48+P0+C0+F11208",  # no last frame
    "Clip+G0DGRma_p48+C0+F11208-11383",  # no person
    "Clip+G0DGRma_p48+P0+C0+F11208-11383x",  # trailing text
    "Clip++P0+C0+F11208-11383",  # no video id
    "G0DGRma_p48+P0+C0+F11208-11383",  # no Clip prefix (not even globbed by discovery)
    "Clip+G0DGRma_p48+P0+C0+FF11208-11383",
])
def test_vfhq_malformed_meta_info_names_are_rejected_with_a_reason(tmp_path, name):
    path = tmp_path / f"{name}.txt"
    path.write_text(meta_info("G0DGRma_p48", range(11208, 11384)))
    issues = []
    candidate = read_meta_info(path, tmp_path, issues)
    assert candidate.reject_reason == "bad_file_name" and "F<first>-<last>" in candidate.reject_detail
    assert [issue.kind for issue in issues] == ["bad_file_name"] and name in issues[0].detail


def test_vfhq_meta_info_found_in_annotations_dir_and_dispatched_by_discover(tmp_path):
    write_vfhq(tmp_path / "elsewhere", video_bytes=None)
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "vidA.webm").write_bytes(b"placeholder")  # yt-dlp kept YouTube's container
    candidates, issues = discover_candidates("vfhq", videos, tmp_path / "elsewhere" / "meta_info")
    by_id = {c.candidate_id: c for c in candidates}
    assert by_id["vidA_P0_C0"].source == str(videos / "vidA.webm") and by_id["vidA_P0_C0"].reject_reason is None
    assert any(i.kind == "malformed_line" for i in issues)
    assert discover_candidates("vfhq", tmp_path / "videos") == ([], [])


# --------------------------------------------------------------------------------------------- MEAD layout


def write_mead(raw: Path, make_video=None, make_audio=None) -> Path:
    """A small MEAD copy: subject M003 with a paired front video, traps, and another camera view."""
    make_video = make_video or (lambda path, variant: path.write_bytes(b"video"))
    make_audio = make_audio or (lambda path: path.write_bytes(b"audio"))
    subject = raw / "M003"
    videos = {
        "video/front/angry/level_2/001.mp4": True,  # paired
        "video/front/neutral/level_1/002.mp4": True,  # paired
        "video/front/happy/level_3/003.mp4": False,  # no microphone recording
        "video/front/surprise/level_1/001.mp4": True,  # not a MEAD emotion (surprised)
        "video/left_30/angry/level_2/001.mp4": False,  # another camera: not used by default
    }
    for variant, (relative, _) in enumerate(videos.items()):
        path = subject / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        make_video(path, variant)
    for relative in ("audio/angry/level_2/001.m4a", "audio/neutral/level_1/002.m4a", "audio/surprise/level_1/001.m4a",
                     "audio/sad/level_1/004.m4a"):  # the last has no video
        path = subject / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        make_audio(path)
    return raw


def test_mead_layout_pairs_front_videos_with_their_microphone_audio(tmp_path):
    raw = write_mead(tmp_path / "mead")
    candidates, issues = mead_candidates(raw)
    by_id = {c.candidate_id: c for c in candidates}
    assert sorted(by_id) == ["M003_front_angry_level_2_001", "M003_front_happy_level_3_003",
                             "M003_front_neutral_level_1_002", "M003_front_surprise_level_1_001"]
    angry = by_id["M003_front_angry_level_2_001"]
    assert angry.audio_source == str(raw / "M003" / "audio" / "angry" / "level_2" / "001.m4a")
    assert (angry.subject, angry.emotion, angry.emotion_level) == ("M003", "angry", 2)
    assert angry.reject_reason is None and angry.dataset == "mead" and angry.end_s is None
    assert by_id["M003_front_neutral_level_1_002"].emotion_level == 1
    assert by_id["M003_front_happy_level_3_003"].reject_reason == "missing_audio"
    assert by_id["M003_front_happy_level_3_003"].audio_source is None
    unknown = by_id["M003_front_surprise_level_1_001"]
    assert unknown.reject_reason == "unknown_emotion" and "surprised" in unknown.reject_detail
    kinds = {(i.kind, i.file) for i in issues}
    assert kinds == {
        ("video_without_audio", "M003/video/front/happy/level_3/003.mp4"),
        ("unknown_emotion", "M003/video/front/surprise/level_1/001.mp4"),
        ("audio_without_video", "M003/audio/sad/level_1/004.m4a"),
        ("view_not_used", "M003/video/left_30"),
    }


def test_mead_views_are_a_setting(tmp_path):
    raw = write_mead(tmp_path / "mead")
    candidates, issues = discover_candidates("mead", raw, layouts=LayoutSettings(mead_views=("front", "left_30")))
    side = {c.candidate_id: c for c in candidates}["M003_left_30_angry_level_2_001"]
    assert side.audio_source.endswith("audio/angry/level_2/001.m4a") and side.notes == ("view:left_30",)
    assert not any(i.kind == "view_not_used" for i in issues)
    # only the other view asked for: the front videos are recorded as not used, nothing else changes
    only_side, issues = discover_candidates("mead", raw, layouts=LayoutSettings(mead_views=("left_30",)))
    assert [c.candidate_id for c in only_side] == ["M003_left_30_angry_level_2_001"]
    assert ("view_not_used", "M003/video/front") in {(i.kind, i.file) for i in issues}


def test_standardise_takes_the_audio_from_the_separate_file_over_the_same_range(frontal_video, tmp_path):
    """The video's own track is speech too (a different sentence): only the microphone's range may come out."""
    microphone = speech_wav(tmp_path / "mic.wav", "Four score and seven years ago our fathers brought forth a nation.")
    settings = load_settings("tiny").standardise
    box = CropBox(160, 0, 320, 320)
    clip = standardise_clip(str(frontal_video), 1.0, 3.0, box, settings, tmp_path, audio_source=str(microphone))
    assert clip.n_frames == 75
    audio, rate = soundfile.read(tmp_path / clip.audio, dtype="float32")
    mic, video_track = _decode_16k(microphone), _decode_16k(frontal_video)
    assert rate == 16000 and len(audio) == 3 * 16000
    assert _correlation(audio, mic[16000:]) > 0.9  # the same seek as the video: 1.0 s into the microphone file
    assert _correlation(audio, mic[:]) < 0.5 and abs(_correlation(audio, video_track[16000:])) < 0.3


# --------------------------------------------------------------------------------------------- end to end


def _clips(out: Path) -> dict[str, dict]:
    return {row["clip_id"]: row for row in pq.read_table(out / TABLES_DIR / CLIPS_TABLE).to_pylist()}


def _shard_member(out: Path, name: str) -> bytes:
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            if name in tar.getnames():
                return tar.extractfile(name).read()
    raise AssertionError(f"{name} is in no shard of {out}")


def _decode_16k(path: Path) -> np.ndarray:
    """The first audio track of ``path`` as 16 kHz mono float32 (ffmpeg), for comparing with clip.wav."""
    result = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-ac", "1",
                             "-ar", "16000", "-f", "f32le", "-"], capture_output=True, check=True, timeout=120)
    return np.frombuffer(result.stdout, np.float32)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    a, b = a[:n] - a[:n].mean(), b[:n] - b[:n].mean()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


@pytest.fixture(scope="module")
def vfhq_run(tmp_path_factory):
    raw = tmp_path_factory.mktemp("vfhq")
    write_vfhq(raw)
    # 6 s at 25 fps: the meta-info frame numbers are this video's frames
    make_talking_video(raw / "vidA.mp4", layout="single", seconds=6.0, fps=25.0)
    out = tmp_path_factory.mktemp("vfhq_out")
    return out, preprocess(dataset="vfhq", raw_dir=str(raw), out_dir=str(out), profile="tiny")


@pytest.fixture(scope="module")
def mead_run(tmp_path_factory):
    raw = tmp_path_factory.mktemp("mead")
    scratch = tmp_path_factory.mktemp("speech")
    speech = speech_wav(scratch / "speech.wav")

    def camera(path: Path, variant: int) -> None:  # the camera's own track is silence
        make_talking_video(path, layout="single", seconds=4.0, fps=25.0, audio="silence", variant=variant)

    def microphone(path: Path) -> None:  # the microphone is speech, AAC in .m4a as MEAD ships it
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(speech), "-t", "6", "-c:a", "aac",
                        "-b:a", "96k", str(path)], check=True, timeout=120)

    write_mead(raw, camera, microphone)
    out = tmp_path_factory.mktemp("mead_out")
    return raw, out, preprocess(dataset="mead", raw_dir=str(raw), out_dir=str(out), profile="tiny")


def test_vfhq_runs_end_to_end(vfhq_run):
    out, summary = vfhq_run
    clips = _clips(out)
    assert {clip_id: (row["status"], row["reason"]) for clip_id, row in clips.items()} == {
        "vidA_P0_C0": ("kept", None),
        "vidA_P0_C1": ("kept", None),
        "vidB_P0_C0": ("rejected", "missing_source"),
        "vidA_P1_C2": ("rejected", "clip_outside_source"),  # frames 400-500 of a 150-frame video
        "vidA_P0_C3": ("rejected", "fps_missing"),
        "vidA_P0_C4": ("kept", None),  # no frame lines: the name's range and the crop line
        "Clip_not-a-vfhq-name": ("rejected", "bad_file_name"),
    }
    assert summary["n_kept"] == 3
    kept = clips["vidA_P0_C0"]
    # F24-126 with the public readers' one-frame trim: (24 + 1) / 25 to (126 - 1) / 25 s
    assert (kept["source_start_s"], kept["source_end_s"], kept["n_frames"]) == (1.0, 5.0, 100)
    assert kept["crop_method"] == "annotated" and kept["crop_size"] == 200
    assert (kept["crop_x"], kept["crop_y"]) == (216, 60)
    moved = clips["vidA_P0_C1"]  # the old F<a>-F<b> name: F49-F126
    assert (moved["source_start_s"], moved["source_end_s"], moved["crop_method"]) == (2.0, 5.0, "annotated")
    no_lines = clips["vidA_P0_C4"]  # no frame lines: the name's range all the same
    assert (no_lines["source_start_s"], no_lines["source_end_s"]) == (1.0, 5.0)
    assert "crop_box_from_landmarks" in clips["vidA_P0_C1"]["notes"]
    assert kept["emotion"] is None and kept["subject"] is None and kept["audio_source"] is None
    issues = pq.read_table(out / TABLES_DIR / "annotation_issues.parquet").to_pylist()
    assert {"malformed_line", "bad_file_name", "fps_missing"} <= {issue["kind"] for issue in issues}


def test_mead_runs_end_to_end_with_the_microphone_audio(mead_run):
    raw, out, summary = mead_run
    clips = _clips(out)
    assert {clip_id: (row["status"], row["reason"]) for clip_id, row in clips.items()} == {
        "M003_front_angry_level_2_001": ("kept", None),
        "M003_front_neutral_level_1_002": ("kept", None),
        "M003_front_happy_level_3_003": ("rejected", "missing_audio"),
        "M003_front_surprise_level_1_001": ("rejected", "unknown_emotion"),
    }
    angry = clips["M003_front_angry_level_2_001"]
    assert (angry["subject"], angry["emotion"], angry["emotion_level"]) == ("M003", "angry", 2)
    assert clips["M003_front_neutral_level_1_002"]["emotion"] == "neutral"
    assert clips["M003_front_surprise_level_1_001"]["emotion"] == "surprise"  # recorded as found, rejected
    assert angry["audio_source"].endswith("M003/audio/angry/level_2/001.m4a")
    assert angry["speech_fraction"] > 0.3  # the camera's silent track would have been rejected no_speech

    # the kept clip's audio is the microphone's speech, not the camera's silent track
    camera_track = _decode_16k(raw / "M003" / "video" / "front" / "angry" / "level_2" / "001.mp4")
    assert np.abs(camera_track).max() < 1e-3
    clip_wav, rate = soundfile.read(io.BytesIO(_shard_member(out, "M003_front_angry_level_2_001.wav")),
                                    dtype="float32")
    microphone = _decode_16k(raw / "M003" / "audio" / "angry" / "level_2" / "001.m4a")
    assert rate == 16000 and len(clip_wav) == 4 * 16000
    assert _correlation(clip_wav, microphone) > 0.9
    issues = {(issue["kind"], issue["file"]) for issue in
              pq.read_table(out / TABLES_DIR / "annotation_issues.parquet").to_pylist()}
    assert ("audio_without_video", "M003/audio/sad/level_1/004.m4a") in issues
    assert ("view_not_used", "M003/video/left_30") in issues


def test_an_empty_layout_fails_naming_what_was_looked_for(tmp_path):
    raw = tmp_path / "mead"
    (raw / "M003" / "video" / "left_60" / "angry" / "level_1").mkdir(parents=True)
    (raw / "M003" / "video" / "left_60" / "angry" / "level_1" / "001.mp4").write_bytes(b"video")
    out = tmp_path / "out"
    with pytest.raises(RunFailed) as failed:
        preprocess(dataset="mead", raw_dir=str(raw), out_dir=str(out), profile="tiny")
    message = str(failed.value)
    assert "'mead'" in message and str(raw) in message and "['front']" in message
    assert "<subject>/video/<view>/<emotion>/level_<n>/<nnn>.mp4" in message and "layouts.mead_views" in message
    assert "views found there: ['left_60']" in message
    assert not (out / "summary.json").exists()

    from flows.preprocess import _no_candidates_message

    message = _no_candidates_message("vfhq", tmp_path / "vfhq", None, "**/*")
    assert "Clip+*.txt" in message and str(tmp_path / "vfhq") in message and "meta_info" in message

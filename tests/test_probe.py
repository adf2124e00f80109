"""Probe stage on small generated videos: the facts of good files, one exact reason code per bad one."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
from media_fixtures import (
    corrupt_mdat,
    ffmpeg_available,
    make_test_audio,
    make_test_video,
    make_zero_duration_video,
    read_gray_frame,
    run_ffmpeg,
    truncate_copy,
    write_garbage,
)

from preprocess.run.records import ProbeResult, Rejection
from preprocess.video.probe import REASONS, ffprobe_json, probe_video, timestamps_irregular

pytestmark = pytest.mark.skipif(not ffmpeg_available(), reason="ffmpeg/ffprobe are not installed")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return tmp_path_factory.mktemp("probe_media")


@pytest.fixture(scope="module")
def normal(media):
    """160x120, 25 fps, 2 s, yuv420p h264 + mono 44.1 kHz aac: the reference file."""
    return make_test_video(media / "normal.mp4", width=160, height=120, seconds=2.0, fps=25)


def _ok(result) -> ProbeResult:
    assert isinstance(result, ProbeResult), result
    return result


def _rejected(result, reason: str) -> Rejection:
    assert isinstance(result, Rejection), result
    assert (result.stage, result.reason) == ("probe", reason), result
    assert reason in REASONS and result.detail
    return result


def test_normal_mp4_facts(normal):
    probe = _ok(probe_video(normal))
    assert probe.path == str(normal)
    assert (probe.width, probe.height, probe.rotation) == (160, 120, 0)
    assert probe.fps == 25.0 and not probe.variable_frame_rate
    assert probe.duration_s == pytest.approx(2.0, abs=0.05)
    assert (probe.pix_fmt, probe.bit_depth, probe.video_codec) == ("yuv420p", 8, "h264")
    assert (probe.audio_codec, probe.audio_sample_rate, probe.audio_channels) == ("aac", 44100, 1)
    assert (probe.n_video_streams, probe.n_audio_streams) == (1, 1)
    assert probe.size_bytes == normal.stat().st_size
    assert probe.notes == ()
    # string paths work too, and the cheap mode gives the same facts
    assert probe_video(str(normal), decode_check=False) == probe


def test_fixtures_are_deterministic(normal, media):
    again = make_test_video(media / "normal_again.mp4", width=160, height=120, seconds=2.0, fps=25)
    assert again.read_bytes() == normal.read_bytes()


def test_awkward_file_names_are_not_read_as_options_or_protocols(normal, media):
    odd_name = media / "-i:weird name.mp4"
    shutil.copy(normal, odd_name)
    assert _ok(probe_video(odd_name)).width == 160


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_display_matrix_rotation(normal, media, degrees):
    rotated = make_test_video(media / f"rot{degrees}.mp4", seconds=1.0, rotation=degrees)
    probe = _ok(probe_video(rotated))
    assert probe.rotation == degrees
    assert f"rotated_{degrees}" in probe.notes
    assert (probe.width, probe.height) == ((120, 160) if degrees in (90, 270) else (160, 120))
    # ffprobe states the matrix as a counter-clockwise angle: a clockwise 90 (phone portrait) is -90
    side_data = ffprobe_json(rotated)["streams"][0]["side_data_list"][0]
    assert side_data["rotation"] % 360 == -degrees % 360
    # ffmpeg's autorotation shows exactly the probed size, turned clockwise by the probed angle
    shown = read_gray_frame(rotated)
    stored = read_gray_frame(rotated, autorotate=False)
    assert shown.shape == (probe.height, probe.width)
    assert np.array_equal(shown, np.rot90(stored, k=-degrees // 90))


def test_ffmpeg_rotate_tag_is_read_the_way_ffmpeg_displays_it(normal, media):
    # ffmpeg 5.1 accepts the legacy tag with stream copy and writes it as a display matrix, but as a
    # 90 degree *counter-clockwise* turn (ffprobe: rotation 90), so the probe reports 270 there. Other
    # versions may differ; what must hold is that the probe agrees with ffmpeg's own autorotation.
    tagged = media / "rotate_tag.mp4"
    run_ffmpeg(["-i", normal, "-c", "copy", "-metadata:s:v:0", "rotate=90", tagged])
    probe = _ok(probe_video(tagged))
    assert probe.rotation in (90, 270)
    assert (probe.width, probe.height) == (120, 160)
    shown = read_gray_frame(tagged)
    assert shown.shape == (160, 120)
    assert np.array_equal(shown, np.rot90(read_gray_frame(normal), k=-probe.rotation // 90))


def test_variable_frame_rate(media):
    vfr = make_test_video(media / "vfr.mp4", seconds=2.0, fps=25, vfr=True)
    stream = ffprobe_json(vfr)["streams"][0]
    assert stream["r_frame_rate"] == "25/1" and stream["avg_frame_rate"] != "25/1"
    probe = _ok(probe_video(vfr))
    assert probe.variable_frame_rate and "variable_frame_rate" in probe.notes
    assert 12.5 < probe.fps < 25  # the average: 25 fps for 1 s, 12.5 fps after


def test_timestamp_irregularity_heuristic():
    assert not timestamps_irregular([i * 512 for i in range(100)])  # 25 fps in 1/12800
    assert not timestamps_irregular([round(i * 1001 / 30) for i in range(100)])  # 29.97 fps in ms: 33/34
    dropped = [i * 40 for i in range(100) if i != 50]  # one lost frame is not a variable rate
    assert not timestamps_irregular(dropped)
    # decode order with B-frames (P before the Bs it anchors): the first packets of a file miss the Bs
    # that fill the last gaps, which must not count as irregular
    pyramid = (7, 3, 1, 0, 2, 5, 4, 6)  # x264's b-pyramid: P, then the middle B, then the others
    decode_order = [0] + [g + k for g in range(1, 400, 8) for k in pyramid]
    first_packets = [f * 40 for f in decode_order[:60]]  # ends ..., g+7, g+3, g+1: gaps of 2, 2 and 4
    assert not timestamps_irregular(first_packets)
    assert timestamps_irregular(first_packets, reorder_tail=0)
    assert timestamps_irregular([i * 40 for i in range(50)] + [2000 + i * 33 for i in range(50)])
    jitter = np.cumsum([33 if i % 3 else 40 for i in range(100)]).tolist()  # phone-style jitter
    assert timestamps_irregular(jitter)
    assert not timestamps_irregular([0, 40, 80])  # too few to say


def test_odd_size(media):
    # libx264 refuses odd sizes in 4:2:0 ("width not divisible by 2"); 4:4:4 has no such constraint
    odd = make_test_video(media / "odd.mp4", width=321, height=241, seconds=1.0, pix_fmt="yuv444p")
    probe = _ok(probe_video(odd))
    assert (probe.width, probe.height, probe.pix_fmt, probe.bit_depth) == (321, 241, "yuv444p", 8)
    assert "odd_size" in probe.notes


def test_ten_bit(media):
    try:
        ten = make_test_video(media / "ten.mp4", seconds=1.0, pix_fmt="yuv420p10le")
    except RuntimeError:  # a libx264 built 8-bit only: ffv1 stores any depth
        ten = make_test_video(media / "ten.mkv", seconds=1.0, pix_fmt="yuv420p10le", codec="ffv1")
    probe = _ok(probe_video(ten))
    assert (probe.pix_fmt, probe.bit_depth) == ("yuv420p10le", 10)
    assert "10_bit" in probe.notes


def test_extra_audio_track_is_noted_and_the_first_one_described(media):
    video = make_test_video(media / "two_audio.mp4", seconds=1.0, extra_audio_track=True)
    probe = _ok(probe_video(video))
    assert (probe.n_video_streams, probe.n_audio_streams) == (1, 2)
    assert (probe.audio_sample_rate, probe.audio_channels) == (44100, 1)  # the second is 22050 Hz stereo
    assert "extra_audio_tracks" in probe.notes


def test_empty_file(media):
    empty = media / "empty.mp4"
    empty.write_bytes(b"")
    _rejected(probe_video(empty), "empty_file")


@pytest.mark.parametrize("name", ["garbage.bin", "garbage.mp4"])
def test_garbage_bytes_are_unreadable(media, name):
    # named .mp4, ffprobe tries the mp4 demuxer and says "moov atom not found": still garbage, not truncated
    _rejected(probe_video(write_garbage(media / name, seed=0)), "unreadable")


def test_directory_is_unreadable(media):
    _rejected(probe_video(media), "unreadable")


def test_missing_path(media):
    _rejected(probe_video(media / "does_not_exist.mp4"), "file_not_found")


def test_truncated_faststart_mp4(media):
    # faststart puts the index first: the cut file still parses, its last second is gone
    whole = make_test_video(media / "faststart.mp4", seconds=2.0, faststart=True)
    cut = truncate_copy(whole, media / "faststart_cut.mp4", 0.6)
    assert ffprobe_json(cut)["format"]["duration"].startswith("2.0")
    _rejected(probe_video(cut), "truncated")
    # without the decode check only the container is read, and it looks whole
    assert _ok(probe_video(cut, decode_check=False)).duration_s == pytest.approx(2.0, abs=0.05)


def test_truncated_mp4_without_index(normal, media):
    # the default layout writes the index last: a cut file has none
    _rejected(probe_video(truncate_copy(normal, media / "plain_cut.mp4", 0.6)), "truncated")


def test_undecodable_media_data(normal, media):
    _rejected(probe_video(corrupt_mdat(normal, media / "corrupt.mp4")), "undecodable")


@pytest.mark.parametrize("name", ["speech.m4a", "speech.wav"])
def test_audio_only_has_no_video_stream(media, name):
    _rejected(probe_video(make_test_audio(media / name)), "no_video_stream")


def test_audio_with_only_cover_art_is_a_still_image(media):
    # cover art is a "video" stream with the attached_pic disposition: a picture, not a video
    _rejected(probe_video(make_test_audio(media / "cover.m4a", cover_art=True)), "still_image")


def test_video_without_audio(media):
    _rejected(probe_video(make_test_video(media / "silent.mp4", seconds=1.0, with_audio=False)),
              "no_audio_stream")


def test_zero_duration(media):
    _rejected(probe_video(make_zero_duration_video(media / "zero.nut")), "zero_duration")


def test_probe_is_cheap(normal):
    start = time.perf_counter()
    _ok(probe_video(normal))
    assert time.perf_counter() - start < 5.0


def test_ffprobe_json_raises_on_garbage(media):
    from preprocess.video.probe import FFprobeError

    with pytest.raises(FFprobeError):
        ffprobe_json(write_garbage(media / "garbage2.bin", seed=1))

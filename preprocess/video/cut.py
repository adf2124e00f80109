"""Stage: write one kept piece of a standardised clip as its own files (frame-exact).

A piece covering the whole clip is copied as is. Otherwise the video is re-encoded between exact frame
indices (``trim`` on frame numbers; keyframe cuts with ``-c copy`` would not be frame-exact), the audio is
sliced at ``frame * 640`` samples, and landmarks and pose are sliced by frame. Every failure here raises (the
piece gets an uncached ``error`` and the next run retries it): its input is the pipeline's own output, so no
failure of this stage is a verdict on the source.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import soundfile

from preprocess.run.cache import link_or_copy
from preprocess.run.media import count_video_frames, run_ffmpeg
from preprocess.run.settings import MediaTimeouts, StandardiseSettings
from preprocess.run.stage import Stage
from preprocess.video.faces import LANDMARKS_FILE, POSE_FILE
from preprocess.video.standardise import AUDIO_FILE, VIDEO_FILE


def cut_piece(
    clip_dir: Path, faces_dir: Path, n_frames: int, frames: tuple[int, int], settings: StandardiseSettings,
    out_dir: Path, limits: MediaTimeouts | None = None,
) -> dict:
    start, end = frames
    if (start, end) == (0, n_frames):
        # the whole clip: the same bytes, linked rather than copied (cache entries are never changed in place)
        for source, name in ((clip_dir, VIDEO_FILE), (clip_dir, AUDIO_FILE), (faces_dir, LANDMARKS_FILE),
                             (faces_dir, POSE_FILE)):
            link_or_copy(source / name, out_dir / name)
        return {"n_frames": n_frames}
    run_ffmpeg([
        "-i", clip_dir / VIDEO_FILE, "-vf", f"trim=start_frame={start}:end_frame={end},setpts=PTS-STARTPTS",
        "-c:v", "libx264", "-preset", settings.preset, "-crf", str(settings.crf), "-pix_fmt", "yuv420p",
        "-an", "-movflags", "+faststart", out_dir / VIDEO_FILE,
        # the trim filter decodes the clip from its start up to ``end``
    ], purpose=f"cutting frames {start}-{end} of {clip_dir / VIDEO_FILE}", media_duration_s=end / settings.fps,
        limits=limits, outputs=(out_dir / VIDEO_FILE,))
    written = count_video_frames(out_dir / VIDEO_FILE, limits=limits)
    if written != end - start:
        raise RuntimeError(f"cut wrote {written} frames, expected {end - start}")
    samples_per_frame = settings.sample_rate // settings.fps
    audio, sample_rate = soundfile.read(clip_dir / AUDIO_FILE, dtype="int16")
    soundfile.write(out_dir / AUDIO_FILE, audio[start * samples_per_frame:end * samples_per_frame], sample_rate,
                    subtype="PCM_16")
    np.save(out_dir / LANDMARKS_FILE, np.load(faces_dir / LANDMARKS_FILE)[start:end])
    np.save(out_dir / POSE_FILE, np.load(faces_dir / POSE_FILE)[start:end])
    return {"n_frames": end - start}


# ---------------------------------------------------------------- the stage (run per piece by the split)


def _cut_run(piece, settings, workspace, out_dir: Path) -> dict:
    job = piece.job
    return cut_piece(workspace.cache.entry_dir("standardise", job.standardise_key),
                     workspace.cache.entry_dir("faces", job.faces_key), job.standardised.n_frames, piece.frames,
                     settings.standardise, out_dir, limits=settings.media)


STAGE = Stage(
    name="pieces", version=1, group="video", timing_name="cut", run=_cut_run,
    applies=lambda piece, settings: piece.rejection is None,  # not yet "kept": it has no files of its own yet
    key_parts=lambda piece, settings, workspace: [piece.job.standardise_key, piece.job.faces_key, piece.frames,
                                                  settings.standardise.fingerprint()],
    finish=lambda piece, entry, settings, workspace: replace(piece, files_dir=entry["dir"], content_key=entry["key"]))

"""Stage: music and noise removal with Demucs; the vocals stem becomes the speech track of every later audio stage.

Input: the piece's time range of the SOURCE file's first audio track, full band, decoded by ffmpeg straight to
the model's rate and channels (``model.samplerate``, ``model.audio_channels``: 44.1 kHz stereo for the
htdemucs family, what it was trained on), not the 16 kHz mono ``clip.wav``, which has lost everything above
8 kHz and the stereo image. The cut is the one standardise makes for ``clip.wav``: ``-ss`` only for a start
after 0, the first audio stream, ``aresample=async=1:first_pts=0`` so a track that starts late is padded at the
front; so vocals and ``clip.wav`` line up sample for sample. A mono source is duplicated to both channels
(ffmpeg's ``-ac 2`` would lower it by 3 dB); more than two channels are downmixed to stereo by ffmpeg.

The mix is normalised as ``demucs.separate`` does (minus the mean, divided by the std of its mono downmix) and
separated by ``demucs.apply.apply_model`` with ``split=True``: the audio is cut into the model's training-length
segments that overlap by ``overlap`` and are cross-faded with a triangular weight, so long audio has no clicks
at the seams. ``shifts=0`` (the random time-shift averaging would make outputs differ from run to run). Only
``model.sources``, ``model.samplerate``, ``model.audio_channels`` and ``apply_model`` are used, so a single
``HTDemucs`` and the ``BagOfModels`` that ``demucs.pretrained.get_model`` returns both work.

Output: the vocals stem, averaged to mono (the downmix standardise applies to ``clip.wav``: ffmpeg's stereo to
mono is the mean of the channels), resampled to ``clip.wav``'s rate (16 kHz), exactly as many samples as the
piece's ``clip.wav``, and multiplied by the loudness gain standardise applied to ``clip.wav``
(``StandardisedClip.gain_db``), so vocals and clip audio are on one scale: the vocals' level relative to the
clip says how much of it was music. They are not normalised again.

Digital silence (peak of the gained mono mix below ``silence_peak_dbfs``) is not separated (Demucs'
normalisation would divide by a zero std): the vocals are silence. An energy check on the vocals (fraction of
30 ms frames above -45 dBFS) decides ``has_speech``; the text, speech-emotion and valence-arousal stages record
flagged rows without numbers for clips without speech. (Whether a piece has speech at all is decided earlier,
by Silero VAD in the filters: ``no_speech`` pieces never reach this stage.)
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile
import torch

from preprocess.audio.audio_io import active_fraction, dbfs, read_mono, write_pcm16
from preprocess.run.media import run_ffmpeg
from preprocess.run.model_loading import LoadedModel, load_model, model_identity
from preprocess.run.settings import MediaTimeouts, SeparationSettings
from preprocess.run.stage import Stage

VOCALS_FILE = "vocals.wav"


@dataclass(frozen=True)
class SeparatedAudio:
    vocals: str  # file name in the stage's output directory
    status: str  # "separated" or "silent_input"
    n_samples: int
    sample_rate: int  # Hz
    input_peak_dbfs: float | None  # of the mono mix at clip.wav's scale (gain applied)
    vocals_rms_dbfs: float | None
    speech_fraction: float  # 0-1 of activity frames above the threshold, in the vocals
    has_speech: bool
    model: str
    source_start_s: float  # the range of the source that was separated
    source_duration_s: float
    source_channels: int  # channels decoded from the source (1: duplicated for the model)
    input_sample_rate: int  # Hz, what Demucs was given (model.samplerate)
    gain_db: float  # standardise's loudness gain, applied to the vocals


def demucs_input(source: str, start_s: float, duration_s: float, model,
                 limits: MediaTimeouts | None = None) -> tuple[torch.Tensor, int]:
    """The source's first audio track over [start_s, start_s + duration_s), as the model takes it.

    Returns ``(mix, source_channels)``: ``mix`` is float32 (model.audio_channels, round(duration_s *
    model.samplerate)) at ``model.samplerate``; audio the source lacks at the end is zeros, and so is the part of a
    range that starts before 0 s (the sync stage delays a piece's audio by padding silence at its front: a piece at
    the source's start then reads from a negative start). ``source_channels`` is what was decoded before a mono
    track was duplicated (1 or 2). ``limits``: ffmpeg's time limit."""
    if start_s < 0:
        lead = int(round(-start_s * model.samplerate))
        mix, source_channels = demucs_input(source, 0.0, max(0.0, start_s + duration_s), model, limits)
        fitted = torch.zeros(mix.shape[0], int(round(duration_s * model.samplerate)))
        fitted[:, lead:] = mix[:, :fitted.shape[1] - lead]
        return fitted, source_channels
    channels, rate = int(model.audio_channels), int(model.samplerate)
    if channels not in (1, 2):
        raise ValueError(f"separation model takes {channels} audio channels; only mono and stereo models are supported")
    layouts = "mono" if channels == 1 else "mono|stereo"  # ffmpeg downmixes anything wider; mono stays mono
    with tempfile.TemporaryDirectory(prefix="demucs-input-") as scratch:
        decoded = Path(scratch) / "mix.wav"
        # No seek for a range from the file's start, as standardise does (a late first video key frame would
        # otherwise drop the audio before it).
        seek = ["-ss", f"{start_s:.6f}"] if start_s > 0 else []
        run_ffmpeg([
            *seek, "-t", f"{duration_s:.6f}", "-i", source, "-map", "0:a:0",
            "-af", f"aresample={rate}:async=1:first_pts=0,aformat=channel_layouts={layouts}",
            "-c:a", "pcm_f32le", decoded,
        ], purpose=f"decoding the audio of {source} for separation", media_duration_s=duration_s, limits=limits,
            outputs=(decoded,))
        audio, decoded_rate = soundfile.read(decoded, dtype="float32", always_2d=True)  # (N, source channels)
    if decoded_rate != rate:
        raise RuntimeError(f"ffmpeg decoded {source} at {decoded_rate} Hz, asked for {rate} Hz")
    source_channels = audio.shape[1]
    mix = torch.from_numpy(np.ascontiguousarray(audio.T))
    if source_channels < channels:
        mix = mix.expand(channels, -1)
    n_samples = int(round(duration_s * rate))
    fitted = torch.zeros(channels, n_samples)
    fitted[:, :min(n_samples, mix.shape[1])] = mix[:, :n_samples]
    return fitted, source_channels


def separate_vocals(source: str, start_s: float, duration_s: float, n_samples: int, sample_rate: int,
                    gain_db: float, loaded: LoadedModel, settings: SeparationSettings, out_dir: Path,
                    limits: MediaTimeouts | None = None) -> SeparatedAudio:
    """Write ``out_dir/vocals.wav``: ``n_samples`` mono samples at ``sample_rate`` (the piece's ``clip.wav``),
    separated from the source's range [start_s, start_s + duration_s), at ``gain_db`` (standardise's gain)."""
    from demucs.apply import apply_model
    from julius import resample_frac

    model = loaded.model
    if settings.stem not in model.sources:
        raise ValueError(f"Demucs model {loaded.reference!r} has no {settings.stem!r} source: {model.sources}")
    mix, source_channels = demucs_input(source, start_s, duration_s, model, limits)
    gain = 10 ** (gain_db / 20)
    reference = mix.mean(0)  # the mono downmix: what clip.wav holds, before its gain
    peak = float(reference.abs().max()) * gain if reference.numel() else 0.0
    vocals = np.zeros(n_samples, np.float32)
    if peak < 10 ** (settings.silence_peak_dbfs / 20):
        status = "silent_input"
    else:
        mean, std = reference.mean(), reference.std().clamp_min(1e-8)
        with loaded.lock, torch.inference_mode():
            sources = apply_model(model, ((mix - mean) / std)[None], shifts=0, split=True,
                                  overlap=settings.overlap, segment=settings.segment_s, device=loaded.device)[0]
        stem = sources[model.sources.index(settings.stem)].cpu() * std + mean  # (channels, N) at model rate
        stem = resample_frac(stem.mean(0), int(model.samplerate), sample_rate) * gain
        n = min(n_samples, stem.shape[-1])
        vocals[:n] = stem[:n].numpy()
        status = "separated"
    write_pcm16(out_dir / VOCALS_FILE, vocals, sample_rate)
    vocals, _ = read_mono(out_dir / VOCALS_FILE)  # measure what later stages will read
    fraction = active_fraction(vocals, sample_rate, settings.activity_frame_ms, settings.activity_frame_dbfs)
    return SeparatedAudio(
        vocals=VOCALS_FILE, status=status, n_samples=len(vocals), sample_rate=sample_rate,
        input_peak_dbfs=dbfs(peak), vocals_rms_dbfs=dbfs(float(np.sqrt(np.mean(vocals.astype(np.float64) ** 2)))),
        speech_fraction=fraction, has_speech=fraction >= settings.min_speech_fraction, model=loaded.reference,
        source_start_s=round(start_s, 6), source_duration_s=round(duration_s, 6), source_channels=source_channels,
        input_sample_rate=int(model.samplerate), gain_db=gain_db,
    )


# ---------------------------------------------------------------- the stage: on each kept piece


def piece_source_range(piece) -> tuple[float, float]:
    """(start, duration) in seconds of the source that a piece's audio covers: the candidate's start as
    standardise seeks it (to the millisecond) plus the piece's first frame, minus the shift the sync stage applied
    to its clip.wav (audio delayed by k frames starts k frames earlier in the source), and its frames' duration."""
    fps, (start, end) = piece.job.standardised.fps, piece.frames
    shift = piece.features.get("sync", {}).get("shift_applied_frames", 0)
    return round(piece.job.candidate.start_s, 3) + (start - shift) / fps, (end - start) / fps


def vocals_path(piece) -> Path:
    """The piece's separated vocals, which every later audio stage reads."""
    separated = piece.features["separate"]
    return Path(separated["dir"]) / separated["vocals"]


def _audio_input(piece, workspace) -> tuple[str, str]:
    """(file, its content hash): the clip's sound comes from its separate audio file when it has one (MEAD's
    microphone), as in standardise."""
    candidate = piece.job.candidate
    if candidate.audio_source:
        return candidate.audio_source, workspace.fingerprint(Path(candidate.audio_source))
    return candidate.source, piece.job.source_sha256


def _n_samples(piece) -> int:
    clip = piece.job.standardised
    return (piece.frames[1] - piece.frames[0]) * (clip.sample_rate // clip.fps)


def _separate_key_parts(piece, settings, workspace) -> list:
    """Keyed on the source's content and range, not on clip.wav."""
    clip = piece.job.standardised
    return [_audio_input(piece, workspace)[1], *piece_source_range(piece), _n_samples(piece), clip.sample_rate,
            clip.gain_db, settings.audio.separation.fingerprint(), model_identity(settings.models.separation)]


def _separate_run(piece, settings, workspace, out_dir: Path) -> dict:
    clip, (start_s, duration_s) = piece.job.standardised, piece_source_range(piece)
    return asdict(separate_vocals(_audio_input(piece, workspace)[0], start_s, duration_s, _n_samples(piece),
                                  clip.sample_rate, clip.gain_db, load_model("separation", settings.models.separation),
                                  settings.audio.separation, out_dir, limits=settings.media))


STAGE = Stage(name="separate", version=2, group="audio", models=("separation",), key_parts=_separate_key_parts,
              run=_separate_run)

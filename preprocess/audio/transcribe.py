"""Stage: Whisper transcription (openai-whisper) of the vocals track.

Runs ``whisper.transcribe`` on the 16 kHz vocals: language detection on the first 30 s unless
``TranscriptionSettings.language`` forces one, greedy decoding (plus Whisper's temperature fallback when
enabled), segment time stamps in seconds from the clip start. Whisper itself drops segments whose no-speech
probability is above ``no_speech_threshold`` while their average log-probability is below
``logprob_threshold``. A clip the separation stage found without speech is not transcribed at all
(``status = "no_speech"``, empty text): Whisper invents text on silence and music.

``status``: ``ok`` (text), ``empty`` (Whisper found nothing to say), ``no_speech`` (not transcribed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from preprocess.audio.audio_io import read_mono
from preprocess.audio.separate import vocals_path
from preprocess.run.model_loading import LoadedModel, load_model, model_identity
from preprocess.run.settings import TranscriptionSettings
from preprocess.run.stage import Stage

FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # whisper.transcribe's default schedule


@dataclass(frozen=True)
class TranscriptSegment:
    start_s: float
    end_s: float
    text: str
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    temperature: float


@dataclass(frozen=True)
class Transcript:
    status: str
    text: str
    language: str | None
    avg_logprob: float | None  # duration-weighted mean over segments
    no_speech_prob: float | None  # mean over segments
    segments: tuple[TranscriptSegment, ...]
    model: str

    def as_json(self) -> dict:
        return asdict(self)


def transcribe_vocals(vocals_path: Path, has_speech: bool, loaded: LoadedModel,
                      settings: TranscriptionSettings) -> Transcript:
    if not has_speech:
        return Transcript("no_speech", "", None, None, None, (), loaded.reference)
    audio, sample_rate = read_mono(vocals_path)
    if sample_rate != 16000:
        raise ValueError(f"{vocals_path} is {sample_rate} Hz; Whisper takes 16 kHz")
    with loaded.lock:  # decoding installs kv-cache hooks on the shared model
        result = loaded.model.transcribe(
            audio, language=settings.language, verbose=None,
            temperature=FALLBACK_TEMPERATURES if settings.temperature_fallback else 0.0,
            condition_on_previous_text=settings.condition_on_previous_text,
            no_speech_threshold=settings.no_speech_threshold, logprob_threshold=settings.logprob_threshold,
            fp16=loaded.device.type == "cuda" and loaded.dtype.itemsize == 2,
        )
    segments = tuple(
        TranscriptSegment(round(float(s["start"]), 3), round(float(s["end"]), 3), s["text"].strip(),
                          float(s["avg_logprob"]), float(s["no_speech_prob"]), float(s["compression_ratio"]),
                          float(s["temperature"]))
        for s in result["segments"]
    )
    text = result["text"].strip()
    durations = [max(s.end_s - s.start_s, 1e-3) for s in segments]
    avg_logprob = (sum(d * s.avg_logprob for d, s in zip(durations, segments, strict=True)) / sum(durations)
                   if segments else None)
    no_speech = sum(s.no_speech_prob for s in segments) / len(segments) if segments else None
    return Transcript("ok" if text else "empty", text, result.get("language"), avg_logprob, no_speech, segments,
                      loaded.reference)


# ---------------------------------------------------------------- the stage: on each kept piece's vocals


STAGE = Stage(
    name="transcribe", version=1, group="audio", models=("transcription",),
    key_parts=lambda piece, settings, workspace: [
        piece.features.get("separate", {}).get("key"), settings.audio.transcription.fingerprint(),
        model_identity(settings.models.transcription)],
    run=lambda piece, settings, workspace, out_dir: transcribe_vocals(
        vocals_path(piece), piece.features["separate"]["has_speech"],
        load_model("transcription", settings.models.transcription), settings.audio.transcription).as_json())

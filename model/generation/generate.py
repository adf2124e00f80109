"""``synchrorama generate``: reference image + driving audio (+ description) -> talking-face mp4 with the audio.

    synchrorama generate --checkpoint out/train --image ref.png --audio drive.wav --out out.mp4
        [--description TEXT] [--steps N] [--seed N] [--profile default|tiny] [--config key=value ...]

The model's conditions are computed from the driving audio with the SAME stages and models that made the
training shards (paper sections 3.3-3.6), called as plain functions (no Prefect, no cache):

1. standardise (``preprocess.video.standardise``): ffmpeg decodes the first audio track to 16 kHz mono (``aresample
   async=1:first_pts=0``, as for ``clip.wav``), zero-padded to whole 25 fps frames (``ceil(samples / 640)``
   frames), loudness-normalised to -23 LUFS by ``normalise_loudness``;
2. separate (``preprocess.audio.separate.separate_vocals``): Demucs on the source's full-band audio over that range
   (``demucs_input``), vocals at ``clip.wav``'s length and gain, as the ``separate`` stage calls it;
3. transcribe, text emotion, speech emotion, valence-arousal windows and wav2vec (``preprocess.audio.transcribe``,
   ``text_emotion``, ``speech_emotion``, ``valence_arousal``, ``wav2vec_features``) on the vocals, exactly as
   the stages run them; the emotion arrays are split as the shard writer splits them
   (``preprocess.run.outputs.emotion_arrays``), and become ``EmotionFeatures`` as training's
   ``stored_emotion`` makes them;
4. the description (given, or written by the configured captioner from the reference image shown as
   ``visual.description.n_frames`` identical frames, the prompt preprocessing uses) is embedded by the CLIP text
   encoder as the ``text_embedding`` stage does (stored float16, read back as float32 like the shards).

wav2vec: training reads the shards' ``wav2vec.npy`` when ``prefer_cached`` and its sizes are the model's, and
otherwise runs the model's own audio encoder over the vocals; generation follows the same rule (the first case
uses the preprocessing stage's frames, aligned to the 25 fps frames by ``features_to_frames``).

The model, its sizes and its frozen VAE / wav2vec come from the checkpoint's saved training config
(``state.json``), with ``--config key=value`` overrides (e.g. ``vae=`` and ``wav2vec=`` folders on another
machine); the weights are ``model.safetensors`` with the EMA of the stage's trained parameters on top
(``--weights model`` for the raw ones). The preprocessing profile defaults to ``tiny`` for a tiny model and
``default`` otherwise. The mp4 carries the standardised (loudness-normalised) driving audio; its metadata
comment and a ``<out>.json`` beside it name the checkpoint, the step, every model used and the inputs, and say
loudly when tiny (random, meaningless) models were used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import soundfile
import torch
from PIL import Image
from safetensors.torch import load_file

from model.config import ModelConfig
from model.emotion_embedding import EmotionFeatures
from model.pipeline import GeneratedVideo, TalkingFacePipeline
from model.synchrorama import SynchroRamaModel
from model.training.train import MANIFEST, frozen_encoders, latest_checkpoint, model_config, video_config
from model.training.train_config import TrainConfig, parse_value
from preprocess.audio.separate import separate_vocals
from preprocess.audio.speech_emotion import classify_speech
from preprocess.audio.text_emotion import score_transcript
from preprocess.audio.transcribe import transcribe_vocals
from preprocess.audio.valence_arousal import valence_arousal_windows
from preprocess.audio.wav2vec_features import wav2vec_frames
from preprocess.pipeline import load_model
from preprocess.run.media import run_ffmpeg
from preprocess.run.outputs import emotion_arrays
from preprocess.run.settings import PreprocessSettings, load_settings
from preprocess.video.standardise import AUDIO_FILE, normalise_loudness
from shards.schema import EMOTION_ARRAYS

log = logging.getLogger("model.generation.generate")

TINY_WARNING = ("TINY MODELS: {what} have random weights; this video MEANS NOTHING (a smoke test of the "
                "machinery, not a result)")


class GenerateError(RuntimeError):
    """A generation input or setting that cannot work, with what to do about it."""


# ------------------------------------------------------------------------------------------ checkpoint


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder (``step-NNNNNNN`` with ``state.json``), its ``checkpoints/`` folder or the run's
    ``out`` folder (then ``checkpoints/latest``)."""
    path = Path(path)
    if (path / "state.json").is_file() and (path / "model.safetensors").is_file():
        return path
    for folder in (path / "checkpoints", path):
        latest = latest_checkpoint(folder) if (folder / "latest").is_file() else None
        if latest is not None and (latest / "state.json").is_file():
            return latest
    raise GenerateError(f"{path} is not a training checkpoint: expected a folder with state.json and "
                        "model.safetensors (checkpoints/step-NNNNNNN) or a run folder with checkpoints/latest "
                        "(written by `synchrorama train`)")


def checkpoint_config(checkpoint: Path, overrides: list[str] = ()) -> TrainConfig:
    """The training config saved with the checkpoint, with ``key=value`` overrides."""
    saved = json.loads((checkpoint / "state.json").read_text()).get("config")
    if not saved:
        raise GenerateError(f"{checkpoint / 'state.json'} holds no training config; re-save it with this version "
                            "of model/training/train.py")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:  # a checkpoint from another version of the code: its other settings still say what it is
        log.warning("ignoring settings this version does not know in %s: %s", checkpoint, unknown)
    values = {k: v for k, v in saved.items() if k in known}
    for item in overrides:
        name, sep, text = item.partition("=")
        if not sep:
            raise GenerateError(f"--config {item!r} is not key=value (a setting of `synchrorama train --help`)")
        try:
            values[name.strip()] = parse_value(name.strip(), text.strip())
        except ValueError as error:
            raise GenerateError(f"--config {item!r}: {error}") from error
    return TrainConfig(**values)


def load_generator(checkpoint: Path, cfg: TrainConfig, weights: str, device: torch.device):
    """(model, vae, audio_encoder, video config) on ``device``, the model in eval mode with ``weights``.

    The last one loaded is kept (``_last_generator``): generating many clips from one checkpoint in a process
    (``synchrorama evaluate --checkpoint``) loads it once, not once per clip. The key holds the checkpoint's
    manifest (its files' hashes), so a re-saved checkpoint at the same path is loaded again."""
    manifest = checkpoint / MANIFEST
    key = (str(checkpoint.resolve()), manifest.read_text() if manifest.is_file() else None,
           json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str), weights, str(device))
    if _last_generator.get("key") != key:
        _last_generator.clear()  # free the previous model before loading the next
        _last_generator.update(key=key, loaded=_load_generator(checkpoint, cfg, weights, device))
    return _last_generator["loaded"]


_last_generator: dict = {}


def _load_generator(checkpoint: Path, cfg: TrainConfig, weights: str, device: torch.device):
    model_cfg = model_config(cfg)
    model = SynchroRamaModel(model_cfg)
    state = load_file(str(checkpoint / "model.safetensors"))
    model.load_state_dict(state)
    if weights == "ema":
        ema = load_file(str(checkpoint / "ema.safetensors"))
        missing = sorted(set(ema) - set(state))
        if missing:
            raise GenerateError(f"{checkpoint / 'ema.safetensors'} has weights the model lacks: {missing[:5]}")
        model.load_state_dict({**state, **ema})
    elif weights != "model":
        raise GenerateError(f"--weights {weights!r}: expected ema or model")
    vae, audio_encoder = frozen_encoders(cfg, model_cfg)
    return (model.to(device).eval(), vae.to(device).eval(), audio_encoder.to(device).eval(),
            video_config(cfg, model_cfg))


# ----------------------------------------------------------------------------- driving audio -> conditions


@dataclass
class DrivingAudio:
    """The driving audio after the preprocessing stages (see the module docstring)."""

    audio: np.ndarray  # float32 (n_frames * 640,) standardised 16 kHz mono mix
    n_frames: int  # at 25 fps
    gain_db: float
    vocals: Path
    wav2vec: np.ndarray  # float16 (n_frames, L + 1, H), as wav2vec.npy
    emotion: dict[str, np.ndarray]  # the emotion.npz arrays
    stages: dict[str, dict]  # each stage's JSON result
    models: dict[str, str]  # stage -> model reference
    tiny: list[str]  # stages that ran tiny models


def standardise_audio(source: Path, settings: PreprocessSettings, out_dir: Path) -> tuple[np.ndarray, int, float]:
    """The driving audio as standardise makes ``clip.wav``: (audio, n_frames, gain_db); writes ``clip.wav``."""
    st = settings.standardise
    raw = out_dir / "raw_audio.wav"
    run_ffmpeg(["-i", str(source), "-map", "0:a:0", "-af", f"aresample={st.sample_rate}:async=1:first_pts=0",
                "-ac", "1", "-ar", str(st.sample_rate), "-c:a", "pcm_s16le", str(raw)],
               purpose=f"decoding the driving audio {source}", limits=settings.media)
    audio, rate = soundfile.read(raw, dtype="float32", always_2d=False)
    raw.unlink()
    per_frame = st.sample_rate // st.fps
    n_frames = math.ceil(len(audio) / per_frame)
    if n_frames == 0:
        raise GenerateError(f"{source} has no audio samples")
    audio = np.pad(audio, (0, n_frames * per_frame - len(audio)))  # whole frames: the last one padded
    audio, _loudness, gain_db, notes = normalise_loudness(audio, rate, st)
    if "silent_audio" in notes:
        log.warning("the driving audio %s is silent: no speech to drive the face", source)
    soundfile.write(out_dir / AUDIO_FILE, audio, rate, subtype="PCM_16")
    return audio, n_frames, gain_db


def driving_audio(source: Path, settings: PreprocessSettings, work_dir: Path) -> DrivingAudio:
    """Run the audio stages on ``source`` (see the module docstring); outputs go under ``work_dir``."""
    models = settings.models
    audio, n_frames, gain_db = standardise_audio(source, settings, work_dir)
    fps, rate = settings.standardise.fps, settings.standardise.sample_rate
    stages: dict[str, dict] = {}
    loaded: dict[str, object] = {}

    def stage_dir(name: str) -> Path:
        folder = work_dir / name
        folder.mkdir(exist_ok=True)
        return folder

    def model(kind: str):
        loaded[kind] = load_model(kind, getattr(models, kind))
        return loaded[kind]

    separated = separate_vocals(str(source), 0.0, n_frames / fps, len(audio), rate, gain_db, model("separation"),
                                settings.audio.separation, stage_dir("separate"), limits=settings.media)
    stages["separate"] = {**asdict(separated), "dir": str(work_dir / "separate")}
    vocals, has_speech = work_dir / "separate" / separated.vocals, separated.has_speech
    if not has_speech:
        log.warning("no speech found in the vocals of %s: the emotion features are the no-speech zeros", source)
    transcript = transcribe_vocals(vocals, has_speech, model("transcription"), settings.audio.transcription)
    stages["transcribe"] = transcript.as_json()
    text = score_transcript(transcript.text, transcript.language, transcript.status, model("text_emotion"),
                            settings.audio.text_emotion, stage_dir("text_emotion"))
    speech = classify_speech(vocals, has_speech, model("speech_emotion"), stage_dir("speech_emotion"))
    va = valence_arousal_windows(vocals, has_speech, model("valence_arousal"), settings.audio.valence_arousal,
                                 models.valence_arousal.batch_size, stage_dir("valence_arousal"))
    wav2vec = wav2vec_frames(vocals, n_frames, fps, model("wav2vec"), stage_dir("wav2vec"))
    for name, result in (("text_emotion", text), ("speech_emotion", speech), ("valence_arousal", va),
                         ("wav2vec", wav2vec)):
        stages[name] = {**json.loads(json.dumps(asdict(result))), "dir": str(work_dir / name)}
    # the shard writer's own split of the three stages' arrays into emotion.npz (reads only ``.features``)
    arrays = emotion_arrays(SimpleNamespace(features=stages))
    return DrivingAudio(
        audio=audio, n_frames=n_frames, gain_db=gain_db, vocals=vocals,
        wav2vec=np.load(work_dir / "wav2vec" / wav2vec.file), emotion=arrays, stages=stages,
        models={kind: m.reference for kind, m in loaded.items()},
        tiny=[kind for kind, m in loaded.items() if m.is_tiny])


def emotion_features(arrays: dict[str, np.ndarray], model_cfg: ModelConfig) -> EmotionFeatures:
    """emotion.npz arrays -> batched ``EmotionFeatures`` (B = 1), as the loader and ``stored_emotion`` give them."""
    d = model_cfg.data
    emotion = EmotionFeatures(*(torch.from_numpy(arrays[name].astype(np.float32))[None] for name in EMOTION_ARRAYS))
    sizes = tuple(t.shape[-1] for t in vars(emotion).values())
    expected = (d.text_emotion_classes, d.text_emotion_dim, d.speech_emotion_classes, d.speech_emotion_dim,
                d.va_values, d.va_dim)
    if sizes != expected:
        raise GenerateError(f"the preprocessing models give emotion features of sizes {sizes}, the model reads "
                            f"{expected}: use the settings profile (--profile) and models the training shards were "
                            "made with")
    return emotion


# ------------------------------------------------------------------------------------- image and description


def reference_image(path: Path, size: int) -> np.ndarray:
    """The image centre-cropped to a square and scaled to ``size`` (Lanczos, as standardise scales the crop):
    uint8 ``(size, size, 3)`` RGB. The face should fill it about as the training crops did."""
    try:
        image = Image.open(path).convert("RGB")
    except (OSError, ValueError) as error:
        raise GenerateError(f"cannot read the reference image {path}: {error}") from error
    w, h = image.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    return np.array(image.crop(box).resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def describe_reference(image: np.ndarray, settings: PreprocessSettings, work_dir: Path) -> tuple[str, str, bool]:
    """(description, captioner reference, tiny?) of the reference image, by the captioner preprocessing uses,
    shown ``n_frames`` identical frames at ``frame_size`` (a still clip: the actions it describes are none)."""
    chosen = settings.visual.description
    captioner = load_model("captioning", settings.models.captioning)
    still = np.asarray(Image.fromarray(image).resize((chosen.frame_size,) * 2, Image.Resampling.BICUBIC))
    if hasattr(captioner.model, "describe_video"):  # VideoLLaMA2's service reads a clip file itself
        clip = work_dir / "reference_still.mp4"
        frames = np.repeat(still[None], max(chosen.n_frames, 2), axis=0)
        GeneratedVideo(frames, np.zeros(len(frames) * 640, np.float32), 25, 16000).save(clip)
        text = captioner.model.describe_video(clip, chosen.prompt, chosen.max_new_tokens).text
    else:
        with captioner.lock:
            text = captioner.model.describe([still] * chosen.n_frames, chosen.prompt, chosen.max_new_tokens)
    if not text.strip():
        log.warning("the captioner %s wrote an empty description: generating without one", captioner.reference)
    return text, captioner.reference, captioner.is_tiny


def description_embedding(text: str, settings: PreprocessSettings, model_cfg: ModelConfig) -> tuple[torch.Tensor, str, bool]:
    """CLIP text last hidden state ``(1, 77, D)`` as the shards store it (float16, read back as float32)."""
    encoder = load_model("text_encoder", settings.models.text_encoder)
    embedding = encoder.model.encode([text])[0]
    d = model_cfg.data
    if embedding.shape != (d.text_tokens, d.text_dim):
        raise GenerateError(f"the text encoder {encoder.reference} gives {embedding.shape}, the model reads "
                            f"{(d.text_tokens, d.text_dim)}: use the settings profile the shards were made with")
    return torch.from_numpy(embedding.astype(np.float32))[None], encoder.reference, encoder.is_tiny


# ------------------------------------------------------------------------------------------- generation


class _StoredFeaturesPipeline(TalkingFacePipeline):
    """The sampling pipeline fed the preprocessing stage's wav2vec frames instead of running the model's own
    audio encoder (what training did when the shards had ``wav2vec.npy``)."""

    def __init__(self, *args, features: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        self.stored_features = features

    def audio_features(self, waveform: np.ndarray) -> torch.Tensor:
        return self.stored_features.to(self.device)


@dataclass
class GenerationResult:
    video: Path
    report: Path
    n_frames: int
    fps: int
    wav2vec: torch.Tensor  # (T, L, D) the audio features the denoiser got
    emotion: EmotionFeatures
    description: str
    info: dict


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def generate_video(checkpoint: str | Path, image: str | Path, audio: str | Path, out: str | Path,
                   description: str | None = None, steps: int | None = None, seed: int = 0,
                   profile: str | None = None, config: list[str] = (), settings_overrides: dict | None = None,
                   weights: str = "ema", device: str = "auto", work_dir: str | Path | None = None) -> GenerationResult:
    """Write ``out`` (mp4 with the driving audio) and ``out`` + ``.json`` (what made it); see the module docstring.

    ``steps``: DDIM steps (None: the recipe's, 40 for the full model); ``config``: ``key=value`` overrides of the
    checkpoint's training config; ``settings_overrides``: nested preprocessing settings overrides (as ``run``);
    ``work_dir``: keep the stages' outputs (clip.wav, vocals, emotion and wav2vec arrays) there (None: a temporary
    folder, removed)."""
    started = time.perf_counter()
    image, audio, out = Path(image), Path(audio), Path(out)
    for what, path in (("reference image", image), ("driving audio", audio)):
        if not path.is_file():
            raise GenerateError(f"the {what} {path} does not exist")
    found = find_checkpoint(checkpoint)
    cfg = checkpoint_config(found, list(config))
    profile = profile or ("tiny" if cfg.model_size == "tiny" else "default")
    settings = load_settings(profile, settings_overrides)
    step = json.loads((found / "state.json").read_text()).get("step")
    if cfg.stage != "stage2":
        log.warning("%s is a %s checkpoint: its audio and emotion layers were never trained (stage 2 trains them)",
                    found, cfg.stage)
    torch_device = resolve_device(device)
    model, vae, audio_encoder, video_cfg = load_generator(found, cfg, weights, torch_device)
    d = video_cfg.data
    if (settings.standardise.fps, settings.standardise.sample_rate) != (d.fps, d.sample_rate):
        raise GenerateError(f"preprocessing runs at {settings.standardise.fps} fps / {settings.standardise.sample_rate}"
                            f" Hz, the model at {d.fps} fps / {d.sample_rate} Hz")

    keep_work = work_dir is not None
    work_dir = Path(work_dir) if keep_work else Path(tempfile.mkdtemp(prefix="synchrorama-generate-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        driving = driving_audio(audio, settings, work_dir)
        emotion = emotion_features(driving.emotion, video_cfg)
        reference = reference_image(image, d.image_size)
        models = dict(driving.models)
        tiny = list(driving.tiny)
        if description is None:
            description, models["captioning"], captioner_tiny = describe_reference(reference, settings, work_dir)
            tiny += ["captioning"] if captioner_tiny else []
            description_source = "captioner"
        else:
            description_source = "given"
        embedding, models["text_encoder"], encoder_tiny = description_embedding(description, settings, video_cfg)
        tiny += ["text_encoder"] if encoder_tiny else []
        has_description = bool(description.strip())

        stored = torch.from_numpy(driving.wav2vec.astype(np.float32))
        use_stored = cfg.prefer_cached and tuple(stored.shape[1:]) == (d.wav2vec_layers, d.wav2vec_dim)
        if use_stored:
            pipeline = _StoredFeaturesPipeline(model, vae, audio_encoder, features=stored)
            features = stored
        else:  # training ran its own audio encoder over the vocals then: so does generation
            log.warning("wav2vec features from the preprocessing model are %s, the model reads %s (or "
                        "prefer_cached=false): running the model's audio encoder over the vocals, as training did",
                        tuple(stored.shape[1:]), (d.wav2vec_layers, d.wav2vec_dim))
            pipeline = TalkingFacePipeline(model, vae, audio_encoder)
        pipeline.cfg = video_cfg
        vocals = soundfile.read(driving.vocals, dtype="float32")[0]
        if not use_stored:
            with torch.no_grad():
                features = pipeline.audio_features(vocals).cpu()
        frames = pipeline.frames(reference, vocals, description_embedding=embedding if has_description else None,
                                 emotion=emotion, num_inference_steps=steps, seed=seed)
        if cfg.model_size == "tiny":
            tiny.insert(0, "the SynchroRaMa model (tiny config, random VAE and wav2vec stand-ins)")
        warning = TINY_WARNING.format(what=", ".join(tiny)) if tiny else None
        info = {
            "checkpoint": str(found.resolve()), "step": step, "stage": cfg.stage, "model_size": cfg.model_size,
            "weights": weights, "seed": seed, "steps": steps or video_cfg.recipe.sample_steps,
            "guidance_scale": video_cfg.recipe.guidance_scale, "image": str(image), "audio": str(audio),
            "n_frames": int(frames.shape[0]), "fps": d.fps, "duration_s": round(driving.n_frames / d.fps, 3),
            "loudness_gain_db": driving.gain_db,
            "description": description, "description_source": description_source,
            "transcript": driving.stages["transcribe"]["text"], "preprocessing_profile": profile,
            "preprocessing_models": models, "audio_features": "preprocessing wav2vec stage" if use_stored
            else "the model's audio encoder on the vocals", "tiny_models": tiny, "warning": warning,
            "seconds": None,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        written = work_dir / "video.mp4"
        GeneratedVideo(frames.cpu().numpy(), driving.audio, d.fps, d.sample_rate).save(written)
        comment = (f"synchrorama generate: checkpoint {info['checkpoint']} step {step} ({cfg.model_size} model, "
                   f"{weights} weights)" + (f"; {warning}" if warning else ""))
        run_ffmpeg(["-i", str(written), "-map", "0", "-c", "copy", "-metadata", f"comment={comment}",
                    "-metadata", "title=SynchroRaMa generation", str(out)],
                   purpose=f"writing {out}", limits=settings.media)
        info["seconds"] = round(time.perf_counter() - started, 2)
        report = out.with_name(out.name + ".json")
        report.write_text(json.dumps(info, indent=1))
        if warning:
            log.warning(warning)
        return GenerationResult(out, report, int(frames.shape[0]), d.fps, features, emotion, description, info)
    finally:
        if keep_work:
            log.info("intermediate files kept in %s", work_dir)
        else:
            shutil.rmtree(work_dir, ignore_errors=True)


def build_parser(prog: str = "python -m model.generation.generate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Reference image + driving audio (+ description) -> talking-face mp4 with the "
        "audio, from a training checkpoint. The emotion and audio features are computed from the driving audio by "
        "the preprocessing stages and models the training shards were made with.")
    parser.add_argument("--checkpoint", required=True,
                        help="a run folder (uses checkpoints/latest) or a checkpoints/step-NNNNNNN folder")
    parser.add_argument("--image", required=True, help="reference image (a face, centre-cropped to a square)")
    parser.add_argument("--audio", required=True, help="driving audio (any file ffmpeg reads; its first audio track)")
    parser.add_argument("--out", required=True, help="the mp4 to write (a .json report is written beside it)")
    parser.add_argument("--description", default=None,
                        help="attributes/actions text; default: the preprocessing captioner describes the image")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the recipe's, 40 for full)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument("--profile", choices=("default", "tiny"), default=None,
                        help="preprocessing settings profile (default: tiny for a tiny model, else default)")
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the checkpoint's training config (repeatable), e.g. "
                             "vae=/models/sd-vae wav2vec=/models/wav2vec2-base")
    parser.add_argument("--settings", default="{}",
                        help='preprocessing settings overrides as JSON, e.g. \'{"models": {"wav2vec": {"model": "..."}}}\'')
    parser.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA or raw trained weights")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] for the model")
    parser.add_argument("--work-dir", default=None,
                        help="keep the stages' outputs (clip.wav, vocals, emotion and wav2vec arrays) in this folder")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m model.generation.generate") -> GenerationResult:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        settings_overrides = json.loads(args.settings)
    except json.JSONDecodeError as error:
        raise GenerateError(f"--settings is not JSON: {error}") from error
    result = generate_video(args.checkpoint, args.image, args.audio, args.out, description=args.description,
                            steps=args.steps, seed=args.seed, profile=args.profile, config=args.config,
                            settings_overrides=settings_overrides, weights=args.weights, device=args.device,
                            work_dir=args.work_dir)
    print(f"{result.video}: {result.n_frames} frames at {result.fps} fps from {result.info['checkpoint']} "
          f"(step {result.info['step']}); report {result.report}")
    if result.info["warning"]:
        print(f"WARNING: {result.info['warning']}")
    return result


if __name__ == "__main__":
    main()

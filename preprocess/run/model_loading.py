"""Loading the model stages' models (audio, emotion, captioning, CLIP text, VAE, sync expert): once per worker process, by model reference, with clear errors.

``load_model(kind, choice)`` returns a ``LoadedModel`` from a process-wide cache keyed by (kind, model,
revision, device, dtype); the first caller loads it (under a lock, so two threads never load the same model
twice) and everyone after gets the same object. Stages call it per clip; the cost is paid once per process.

A model reference (``ModelChoice.model``) is one of:
- a local path (a relative path is taken from the repository root). A path inside the tiny models directory
  (``.models/tiny``) that does not exist yet is built on the spot by ``tiny_models``;
- a Hugging Face hub id (text/speech emotion, valence-arousal, wav2vec), read from the local hub cache when
  ``HF_HUB_OFFLINE=1``;
- a Demucs model name (``htdemucs``, ``htdemucs_ft``, ...) or an openai-whisper name (``tiny`` ... ``large-v3``),
  read from (or, online, downloaded into) their usual caches. A local Demucs model is named by the path of its
  bag ``<name>.yaml`` (or of a single ``<sig>-<checksum>.th`` package) in a local model repo folder, and is
  loaded by ``demucs.pretrained.get_model(name, repo=folder)`` as the named ones are; separation always gets a
  ``BagOfModels``;
- for captioning, ``videollama2:<path or id>`` runs VideoLLaMA2 in its own environment, behind a Prefect
  deployment (``preprocess.visual.describe_videollama2``).

A model that cannot be found raises ``ModelNotFoundError`` naming the model, where it was looked for and how to
get it. ``revision`` is passed to every transformers ``from_pretrained`` of a hub id; where it cannot be honoured
(a local folder, Demucs and Whisper names, the wrappers that load without one) setting it raises ``ValueError``
rather than being ignored. Whisper and Demucs runs hold ``LoadedModel.lock``: Whisper installs key/value-cache
hooks on the shared module during decoding and Demucs bags move sub-models between devices, so neither is safe
to run from two threads at once; the transformers models are (inference only, no state).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from preprocess.run.cache import file_fingerprint, stable_hash
from preprocess.run.failures import ModelNotFoundError
from preprocess.run.settings import TINY_MODELS_DIR, ModelChoice

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_DIR = REPO_ROOT / TINY_MODELS_DIR

KINDS = ("separation", "transcription", "text_emotion", "speech_emotion", "valence_arousal", "wav2vec",
         "captioning", "text_encoder", "vae", "sync_expert")
VIDEOLLAMA2_PREFIX = "videollama2:"


@dataclass
class LoadedModel:
    kind: str
    reference: str  # the model reference as configured (recorded in every output row)
    model: Any
    device: torch.device
    dtype: torch.dtype
    processor: Any = None  # tokenizer or feature extractor, when the model has one
    is_tiny: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


_cache: dict[tuple, LoadedModel] = {}
_cache_lock = threading.Lock()
_key_locks: dict[tuple, threading.Lock] = {}
load_count: dict[str, int] = {}  # loads per kind in this process (tests check that a model loads once)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Half precision only on CUDA: on CPU it is slower and some kernels lack it."""
    if device.type != "cuda":
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def local_path(reference: str) -> Path | None:
    """The local path a reference names, or None when it is a hub id / model name."""
    if reference.startswith(("/", "./", "../", "~")) or reference.startswith(".models"):
        path = Path(reference).expanduser()
        return path if path.is_absolute() else REPO_ROOT / path
    return None


def is_tiny_reference(reference: str) -> bool:
    path = local_path(reference)
    return path is not None and TINY_DIR in (path, *path.parents)


Loader = Callable[[ModelChoice, torch.device, torch.dtype], 'LoadedModel']


class TinyModelBuilder(Protocol):
    """What builds the tiny profile's models on first use (``tiny_models``, registered by the CLI, the flows and
    the tests: the stages never import test-model builders). ``version`` is part of every tiny model's identity."""

    version: int

    def build(self, directory: Path) -> Path: ...


_tiny_builder: TinyModelBuilder | None = None


def register_tiny_builder(builder: TinyModelBuilder) -> None:
    global _tiny_builder
    _tiny_builder = builder


def model_identity(choice: ModelChoice) -> str:
    """What a stage key knows of its model: the reference, revision, device and dtype; for a local path also the
    content of its files (a model replaced in place at the same path is a new model); for a tiny model the version
    of the tiny-model builder instead (they are rebuilt from code, and may not be built yet when a run plans)."""
    if not is_tiny_reference(choice.model):
        path = local_path(choice.model)
        if path is None or not path.exists():  # a hub id (its revision pins it), or missing: the preflight says so
            return choice.fingerprint()
        return f"{choice.fingerprint()}:sha256-{local_model_hash(path)}"
    if _tiny_builder is None:
        raise ModelNotFoundError(
            f"{choice.model} is a tiny test model, and no tiny-model builder is registered in this process: run "
            "through `synchrorama` or the flows (which register tiny_models), or call "
            "preprocess.run.model_loading.register_tiny_builder(tiny_models.BUILDER)")
    return f"{choice.fingerprint()}:tiny-v{_tiny_builder.version}"


# Content hashes of local model files, memoised on disk by path, size and mtime (``file_fingerprint``): a model
# folder is hashed once, and again only when a file of it changes; and in this process by the folder's file stats.
FILE_HASH_MEMO = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "synchrorama" / "file-sha256"
_local_hashes: dict[tuple, str] = {}


def model_files(path: Path) -> list[Path]:
    """The files a local model reference consists of: every file under a folder (configs, tokenizer, weights; links
    followed, hidden entries skipped), a file itself, and for a Demucs bag (``.yaml``) the ``.th`` files beside it."""
    if path.is_dir():
        return sorted(file for file in path.rglob("*") if file.is_file()
                      and not any(part.startswith(".") for part in file.relative_to(path).parts))
    if path.suffix == ".yaml":
        return [path, *sorted(path.parent.glob("*.th"))]
    return [path]


def local_model_hash(path: Path) -> str:
    """One hash of a local model's files' names and contents (see ``model_files``)."""
    files = model_files(path)
    stats = [file.stat() for file in files]
    signature = tuple((str(file), stat.st_size, stat.st_mtime_ns) for file, stat in zip(files, stats, strict=True))
    if signature not in _local_hashes:
        root = path if path.is_dir() else path.parent
        _local_hashes[signature] = stable_hash([(file.relative_to(root).as_posix(),
                                                 file_fingerprint(file, FILE_HASH_MEMO)) for file in files])
    return _local_hashes[signature]


def load_model(kind: str, choice: ModelChoice, loader: Loader | None = None) -> LoadedModel:
    """The loaded model for ``choice`` (see the module docstring); loads it on first use in this process, with
    ``loader`` (a stage's own, for the models whose classes live in the stage's module) or this module's."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; one of {KINDS}")
    loader = loader or _LOADERS.get(kind)
    if loader is None:
        raise ValueError(f"model kind {kind!r} is loaded by its stage's own loader: call "
                         f"preprocess.pipeline.load_model({kind!r}, choice)")
    _check_revision(kind, choice)
    device = resolve_device(choice.device)
    dtype = resolve_dtype(choice.dtype, device)
    key = (kind, choice.model, choice.revision, str(device), str(dtype))
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        key_lock = _key_locks.setdefault(key, threading.Lock())
    with key_lock:
        with _cache_lock:
            if key in _cache:
                return _cache[key]
        loaded = loader(choice, device, dtype)
        loaded.is_tiny = is_tiny_reference(choice.model)
        with _cache_lock:
            _cache[key] = loaded
            load_count[kind] = load_count.get(kind, 0) + 1
        return loaded


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


# Loaders that cannot pin a hub revision, and why: a revision set for them is an error, never silently ignored.
_NO_REVISION = {
    "separation": "Demucs loads its models by name (demucs.pretrained.get_model takes no revision)",
    "transcription": "openai-whisper downloads its checkpoints by name (whisper.load_model takes no revision)",
}


def _check_revision(kind: str, choice: ModelChoice) -> None:
    """Raise ValueError when ``choice.revision`` is set but this loader cannot honour it."""
    if choice.revision is None:
        return
    if kind in _NO_REVISION:
        why = _NO_REVISION[kind]
    elif choice.model.startswith(VIDEOLLAMA2_PREFIX):
        why = "VideoLLaMA2 runs in its own environment, which loads the model it is given by path or id"
    elif local_path(choice.model) is not None:
        why = "a local folder has no revisions (transformers ignores revision= for one)"
    else:
        return
    raise ValueError(f"settings models.{kind}.revision is {choice.revision!r} but cannot be honoured for "
                     f"{choice.model!r}: {why}. Remove the revision (pin the model by its files instead: a local "
                     "path, or a cache that holds only that version).")


def _ensure_local(kind: str, path: Path, how: str) -> Path:
    if TINY_DIR in (path, *path.parents) and _tiny_builder is not None:
        _tiny_builder.build(TINY_DIR)  # builds only what is missing or from an older version of the builder
    if not path.exists():
        raise ModelNotFoundError(f"{kind} model not found: looked for the local path {path}. {how}")
    return path


def _hub_error(kind: str, reference: str, revision: str | None, error: Exception) -> ModelNotFoundError:
    from huggingface_hub.constants import HF_HUB_CACHE

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    return ModelNotFoundError(
        f"{kind} model {reference!r} (revision {revision or 'default'}) not found: looked in the Hugging Face "
        f"cache {HF_HUB_CACHE}{' (HF_HUB_OFFLINE=1: no download tried)' if offline else ' and on the hub'}. "
        f"Get it on a machine with network access with `huggingface-cli download {reference}"
        f"{' --revision ' + revision if revision else ''}` (then copy the cache, or set HF_HOME), point "
        f"settings models.{kind}.model at a local directory, or use profile 'tiny' for offline tests "
        f"({type(error).__name__}: {str(error)[:200]})")


def model_source(kind: str, choice: ModelChoice) -> str:
    """What from_pretrained reads: the local folder (built first when it is a tiny one) or the hub id."""
    path = local_path(choice.model)
    if path is None:
        return choice.model
    return str(_ensure_local(kind, path, "Build tiny models with `synchrorama build-tiny-models`, or save a "
                                         "model there with save_pretrained()."))


def from_pretrained(kind: str, cls, choice: ModelChoice, **kwargs):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per model in every worker's log is noise
    try:
        return cls.from_pretrained(model_source(kind, choice), revision=choice.revision, **kwargs)
    except OSError as error:  # transformers' "not found / can't connect" errors are OSErrors
        raise _hub_error(kind, choice.model, choice.revision, error) from error


def prepare_module(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    return model.to(device=device, dtype=dtype).eval()


def _demucs_local_name(path: Path) -> tuple[Path, str]:
    """(repo folder, bag name or model signature) of a local Demucs reference, as get_model(name, repo) takes."""
    if path.is_file() and path.suffix == ".yaml":
        return path.parent, path.stem
    if path.is_file() and path.suffix == ".th":  # demucs names a package <signature>-<sha256[:8]>.th
        return path.parent, path.stem.rsplit("-", 1)[0]
    bags = sorted(p.name for p in path.glob("*.yaml")) if path.is_dir() else []
    raise ModelNotFoundError(
        f"separation model {path} is not a Demucs bag (.yaml) or model package (.th): point settings "
        f"models.separation.model at the bag file inside a local Demucs repo folder"
        f"{' (this folder holds ' + ', '.join(bags) + ')' if bags else ''}.")


def _check_demucs_packages(repo: Path, name: str) -> None:
    """Refuse local Demucs packages that hold more than a model class, its arguments and tensors.

    ``demucs.states.load_model`` unpickles ``.th`` packages with ``torch.load(weights_only=False)`` (a package
    names its model class), which would run whatever code a crafted file carries. Each package the bag needs is
    first read with torch's weights-only unpickler allowing only the Demucs model classes and ``Fraction`` (the
    type of HTDemucs' ``segment``): a file that passes contains nothing else, so demucs' own load of it is safe.
    """
    from fractions import Fraction

    import yaml
    from demucs.demucs import Demucs
    from demucs.hdemucs import HDemucs
    from demucs.htdemucs import HTDemucs

    bag = repo / f"{name}.yaml"
    signatures = yaml.safe_load(bag.read_text()).get("models", []) if bag.is_file() else [name]
    packages = {file.stem.rsplit("-", 1)[0]: file for file in repo.glob("*.th")}
    for signature in signatures:
        file = packages.get(signature)
        if file is None:
            continue  # get_model reports the missing model
        try:
            with torch.serialization.safe_globals([Demucs, HDemucs, HTDemucs, Fraction]):
                torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ModelNotFoundError(
                f"separation model package {file} cannot be read safely: it holds more than a Demucs model class, "
                f"its arguments and tensors, so it is not unpickled. Re-save it as demucs' release format "
                f"{{'klass', 'args', 'kwargs', 'state'}} ({type(error).__name__}: {str(error)[:300]})") from error


def _demucs_not_found(name: str, error: Exception) -> ModelNotFoundError:
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        from demucs.hf import DEFAULT_NAMESPACE, hf_repo_name

        namespace, short = name.split("/", 1) if "/" in name else (DEFAULT_NAMESPACE, name)
        hub_repo = f" (repository {namespace}/{hf_repo_name(short)})"
    except ImportError:  # demucs before 4.1 has no Hugging Face hub loader
        hub_repo = ""
    legacy = Path(torch.hub.get_dir()) / "checkpoints"
    return ModelNotFoundError(
        f"separation model {name!r} (Demucs) not found: demucs looked in the Hugging Face cache {HF_HUB_CACHE}"
        f"{hub_repo}, then in {legacy} (its legacy download). Get it on a machine with network access with "
        f"`python -c \"from demucs.pretrained import get_model; get_model('{name}')\"` and copy those caches (or "
        f"set HF_HOME / TORCH_HOME), point settings models.separation.model at the bag .yaml of a local Demucs "
        f"repo folder, or use profile 'tiny' ({type(error).__name__}: {str(error)[:200]})")


def _load_separation(choice: ModelChoice, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Demucs through ``demucs.pretrained.get_model``, for a model name and for a local repo alike; always a
    ``BagOfModels`` (a single model is bagged), whose ``sources``, ``samplerate`` and ``audio_channels`` the stage
    reads and which ``demucs.apply.apply_model`` runs."""
    from demucs.apply import BagOfModels
    from demucs.pretrained import get_model
    from demucs.repo import ModelLoadingError

    path = local_path(choice.model)
    if path is not None:
        _ensure_local("separation", path, "Build tiny models with `python -m tiny_models DIR`, or "
                                          "point it at the bag .yaml of a local Demucs repo folder.")
        repo, name = _demucs_local_name(path)
        _check_demucs_packages(repo, name)
        try:
            model = get_model(name, repo=repo)
        except (ModelLoadingError, OSError, KeyError) as error:  # missing or corrupt package, bad checksum
            raise ModelNotFoundError(
                f"separation model {choice.model!r}: demucs could not load {name!r} from the local repo {repo} "
                f"(bags are <name>.yaml listing model signatures, models <sig>-<sha256[:8]>.th packages) "
                f"({type(error).__name__}: {str(error)[:300]})") from error
    else:
        try:
            model = get_model(choice.model)
        except Exception as error:  # demucs raises ValueError/URLError/ModelLoadingError depending on the case
            raise _demucs_not_found(choice.model, error) from error
    if not isinstance(model, BagOfModels):
        model = BagOfModels([model])
    # Demucs runs in float32: its STFT path does not take half precision.
    return LoadedModel("separation", choice.model, model.to(device).eval(), device, torch.float32)


def _load_transcription(choice: ModelChoice, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    import whisper

    path = local_path(choice.model)
    if path is not None:
        _ensure_local("transcription", path, "Save a checkpoint {'dims', 'model_state_dict'} there.")
        model = whisper.load_model(str(path), device=device)
    else:
        root = Path(os.getenv("XDG_CACHE_HOME", Path.home() / ".cache")) / "whisper"
        if choice.model not in whisper.available_models():
            raise ModelNotFoundError(f"transcription model {choice.model!r} is not a Whisper model name "
                                     f"({', '.join(whisper.available_models())}) nor a local checkpoint path")
        try:
            model = whisper.load_model(choice.model, device=device, download_root=str(root))
        except Exception as error:  # urllib errors offline
            raise ModelNotFoundError(
                f"transcription model {choice.model!r} (openai-whisper) not found: looked in {root}. Get it on a "
                f"machine with network access with `python -c \"import whisper; whisper.load_model("
                f"'{choice.model}')\"` and copy {root}, or use profile 'tiny' "
                f"({type(error).__name__}: {str(error)[:200]})") from error
    # Whisper keeps its weights in float32 and casts inside decoding (fp16=True on CUDA).
    return LoadedModel("transcription", choice.model, model.eval(), device,
                       torch.float16 if dtype == torch.float16 else torch.float32)


def _load_text_emotion(choice: ModelChoice, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = from_pretrained("text_emotion", AutoTokenizer, choice)
    model = from_pretrained("text_emotion", AutoModelForSequenceClassification, choice)
    return LoadedModel("text_emotion", choice.model, prepare_module(model, device, dtype), device, dtype, tokenizer)


def _load_speech_emotion(choice: ModelChoice, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    extractor = from_pretrained("speech_emotion", AutoFeatureExtractor, choice)
    model = from_pretrained("speech_emotion", AutoModelForAudioClassification, choice)
    return LoadedModel("speech_emotion", choice.model, prepare_module(model, device, dtype), device, dtype, extractor)


def _load_wav2vec(choice: ModelChoice, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoFeatureExtractor, Wav2Vec2Model

    extractor = from_pretrained("wav2vec", AutoFeatureExtractor, choice)
    model = from_pretrained("wav2vec", Wav2Vec2Model, choice)
    return LoadedModel("wav2vec", choice.model, prepare_module(model, device, dtype), device, dtype, extractor)


def wrapped_loader(kind: str, choice: ModelChoice, build):
    """Run a wrapper's constructor, turning its not-found errors into the one error type the stages report."""
    try:
        return build()
    except (FileNotFoundError, ImportError) as error:
        raise ModelNotFoundError(f"{kind} model {choice.model!r}: {error}") from error


def _load_sync_expert(choice: ModelChoice, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """syncnet_v2 (``model.syncnet``) from a local state-dict file (sizes from ``<file>.json`` when present, see
    ``model.syncnet.load_sync_expert``); float32, frozen. It is on no hub, so a reference must be a path."""
    from model.syncnet import WEIGHTS_HELP, SyncNetWeightsError, load_sync_expert

    path = local_path(choice.model)
    if path is None:
        raise ModelNotFoundError(f"sync_expert model {choice.model!r} is not a local path (absolute, or starting "
                                 f"with ./ or .models/): syncnet_v2 is on no model hub. {WEIGHTS_HELP}")
    _ensure_local("sync_expert", path, f"Put syncnet_v2.model there or point settings models.sync_expert.model at "
                                       f"it. {WEIGHTS_HELP}")
    try:
        model = load_sync_expert(path, device)
    except SyncNetWeightsError as error:
        raise ModelNotFoundError(f"sync_expert model {choice.model!r}: {error}") from error
    return LoadedModel("sync_expert", choice.model, model, device, torch.float32)


_LOADERS = {
    "separation": _load_separation,
    "transcription": _load_transcription,
    "text_emotion": _load_text_emotion,
    "speech_emotion": _load_speech_emotion,
    "wav2vec": _load_wav2vec,
    "sync_expert": _load_sync_expert,
}

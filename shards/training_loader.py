"""Training windows streamed from clip shards: what ``model/training/train.py`` iterates over.

Each clip of the preprocessing shards (``shards/schema.py``) gives one window per visit: ``motion_frames``
(M) consecutive frames, then ``clip_frames`` (T) frames to generate, plus one reference frame drawn anywhere
in the clip (Hallo's recipe). A stage reads only what it needs:

=========  ==================================================================================
``a2m``     reference + the M motion frames, audio of the M frames
``stage1``  reference + the T frames (use T = 1, M = 0: image pairs), description
``stage2``  reference + M + T frames, audio of the M + T frames, emotion, AUs, description
=========  ==================================================================================

Cached members are used when the clip has them and decoding falls back otherwise (``prefer_cached``):
``latents.npy`` instead of decoding the mp4, ``wav2vec.npy`` instead of running the audio encoder in the loop,
``vocals.wav`` instead of ``wav``. Missing emotion/AU/description inputs are simply absent
from the batch; the loop substitutes zeros and logs it once. A cached ``wav2vec.npy`` whose stored hidden states
(the clip json's ``audio.wav2vec.layers``) are not the ones the model reads (``WindowSpec.wav2vec_layers``) stops
the run with ``Wav2VecLayersMismatch``: every clip of such shards would be wrong in the same way.

A batch (``collate_windows``, all windows of one batch from one DataLoader worker) is a dict of tensors:

    frames        uint8 (B, M+T, 3, S, S)      when the clip has no latents (S = ``image_size``)
    latents       float32 (B, M+T, 4, h, w)    scaled SD-VAE latents, when cached
    reference     uint8 (B, 3, S, S) or reference_latents float32 (B, 4, h, w)
    audio         float32 (B, (M+T) * 640)     16 kHz waveform of the window (vocals when present)
    wav2vec       float32 (B, M+T, L, D)       when cached (L: the stored hidden states, checked)
    first_frame   int64 (B,)                   source index of the window's first frame
    emotion.*     the arrays of ``emotion.npz`` (text_probs (B, 7), ..., va_values (B, K, 3), va_embedding)
    aus           float32 (B, T, N_AU);  description float32 (B, 77, 768)
    position      (logical worker, raw samples that worker has consumed after this batch)
    produce_s     seconds the worker spent producing the batch (reading + decoding)

Order and splitting are deterministic so that a resumed run sees exactly the batches it would have seen:
every epoch the shard list is shuffled with ``seed + epoch`` (the same on every rank); with at least as many
shards as ranks x workers, each (rank, worker) reads every n-th shard, otherwise every n-th sample. Samples
pass a seeded shuffle buffer, and each window's random choices come from a generator seeded by its position
in the stream. A worker resumed at position ``p`` re-reads and drops its first ``p`` raw samples without
decoding them. A sample that fails to decode is logged, counted in ``skipped`` and dropped, never fatal.

Shards are read through ``shards.reader.verified_samples``: each local shard is checked against its manifest
when it is opened (``verify``: ``"sha256"``, ``"count"`` or ``"off"``, see ``shards/reader.py``); a shard whose
bytes are not its manifest's is skipped whole and every sample a shard did not deliver is counted in
``skipped``. The loader does not train on what is left whatever it is: each worker checks each epoch it read
from the start, and raises ``TrainingDataError`` after an epoch that produced no window (without this check,
a stream whose every sample fails would loop forever without yielding) or whose skipped share of samples is
over ``max_skip_fraction``.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import logging
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds

from shards import schema
from shards.reader import (
    LOST,
    ClipDecodeError,
    SkipCounter,
    decode_wav,
    load_npy,
    shard_urls,
    verified_samples,
)
from shards.schema import (  # the members this loader reads
    AUS_MEMBER,
    DESCRIPTION_MEMBER,
    EMOTION_ARRAYS,
    EMOTION_MEMBER,
    LATENTS_MEMBER,
    VOCALS_MEMBER,
    WAV2VEC_MEMBER,
)

log = logging.getLogger(__name__)

STAGE_NEEDS = {  # which parts of a window each stage reads
    "a2m": {"motion", "audio"},
    "stage1": {"clip", "description"},
    "stage2": {"motion", "clip", "audio", "emotion", "aus", "description"},
}


@dataclass
class WindowSpec:
    """What to cut from each clip. ``image_size``: frames are resized (area) from 512 to this."""

    stage: str
    clip_frames: int
    motion_frames: int
    image_size: int = schema.FRAME_SIZE
    prefer_cached: bool = True
    latent_size: int = schema.FRAME_SIZE // 8  # cached latents of another size are ignored (pixels used instead)
    # The reference frame is at least this many frames away from every frame the stage generates (the motion
    # frames for a2m, the clip frames otherwise); 1 keeps it off the target itself (paper section 4: "one frame
    # ... as the reference frame and another as the target frame"); 0 draws it anywhere (Hallo).
    min_reference_distance: int = 0
    # The wav2vec 2.0 hidden states the model reads (``DataShapes.wav2vec_hidden_states``): cached features that
    # hold others are refused. None: not checked.
    wav2vec_layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.stage not in STAGE_NEEDS:
            raise ValueError(f"unknown stage {self.stage!r}; expected one of {sorted(STAGE_NEEDS)}")

    @property
    def needs(self) -> set[str]:
        return STAGE_NEEDS[self.stage]

    @property
    def frames(self) -> int:
        """Frames of the window that the stage reads: the motion frames for a2m, else M + T."""
        return self.motion_frames if self.stage == "a2m" else self.motion_frames + self.clip_frames

    def members(self) -> frozenset[str]:
        wanted = {schema.META_MEMBER, schema.VIDEO_MEMBER}
        if self.prefer_cached:
            wanted.add(LATENTS_MEMBER)
        if "audio" in self.needs:
            wanted |= {schema.AUDIO_MEMBER, VOCALS_MEMBER} | ({WAV2VEC_MEMBER} if self.prefer_cached else set())
        if "emotion" in self.needs:
            wanted.add(EMOTION_MEMBER)
        if "aus" in self.needs:
            wanted.add(AUS_MEMBER)
        if "description" in self.needs:
            wanted.add(DESCRIPTION_MEMBER)
        return frozenset(wanted)


class TrainingDataError(RuntimeError):
    """The training data cannot be trusted: an epoch gave no window, or skipped too many of its samples."""


class Wav2VecLayersMismatch(TrainingDataError):
    """A shard's cached wav2vec features hold other hidden states than the model reads."""


def stored_wav2vec_layers(meta: dict[str, Any], stored_shape: Sequence[int]) -> tuple[int, ...]:
    """The hidden-state indices a clip's ``wav2vec.npy`` holds, from its json (``audio.wav2vec.layers``).

    Shards written before that entry existed stored every hidden state, in order: 0..K-1 for K stored."""
    layers = ((meta.get("audio") or {}).get("wav2vec") or {}).get("layers")
    if layers is None:
        return tuple(range(stored_shape[1]))
    if len(layers) != stored_shape[1]:
        raise ClipDecodeError(f"wav2vec.npy holds {stored_shape[1]} hidden states, its json lists {len(layers)}")
    return tuple(int(layer) for layer in layers)


def check_wav2vec_layers(meta: dict[str, Any], stored_shape: Sequence[int], spec: WindowSpec, where: str) -> None:
    """Raise ``Wav2VecLayersMismatch`` when the stored hidden states are not those ``spec`` needs."""
    stored = stored_wav2vec_layers(meta, stored_shape)
    if spec.wav2vec_layers is None or stored == tuple(spec.wav2vec_layers):
        return
    raise Wav2VecLayersMismatch(
        f"{where}: the cached wav2vec features hold hidden states {list(stored)} (the clip json's "
        f"audio.wav2vec.layers), the model reads {list(spec.wav2vec_layers)} (model config "
        f"data.wav2vec_layers={len(spec.wav2vec_layers)}). Preprocess again with audio.wav2vec.layers set to the "
        "model's (None: all), or train with prefer_cached=false to run the audio encoder on the clips' audio")


@dataclass
class EpochCounts:
    """What one worker saw in one epoch: windows made, samples that failed to decode, samples lost in shards."""

    windows: int = 0
    failed: int = 0
    lost: int = 0
    resumed: int = 0  # samples dropped unread because a resumed run had consumed them
    first_problem: str | None = None
    bad_shards: dict[str, int] = field(default_factory=dict)  # shard -> samples skipped in it

    def skip(self, url: Any, problem: str) -> None:
        self.bad_shards[str(url)] = self.bad_shards.get(str(url), 0) + 1
        self.first_problem = self.first_problem or problem


@dataclass
class TrainingWindows(torch.utils.data.IterableDataset):
    """An endless, deterministic stream of batches of training windows (see the module docstring).

    ``urls``: a shard directory, a tar, a WebDataset spec (braces, ``pipe:``, http) or a list of them.
    ``start_positions``: {logical worker: raw samples already consumed} from a checkpoint;
    ``worker_offset``: rotate worker ids so that after resuming the DataLoader's round-robin continues with the
    worker whose batch is due next (batches consumed modulo the number of workers).
    ``verify``: what each local shard is checked against its manifest for when it is opened (``"sha256"``,
    ``"count"``, ``"off"``; see ``shards/reader.py``). ``max_skip_fraction``: the share of an epoch's samples
    (per worker: failed to decode, or lost in a shard) above which the loader raises ``TrainingDataError``
    instead of training on what is left; an epoch with no window at all always raises. The epoch a resumed
    worker starts in is not judged (it was partly read before the resume).
    """

    urls: Any
    spec: WindowSpec
    batch_size: int
    seed: int = 0
    shuffle_buffer: int = 64
    rank: int = 0
    world_size: int = 1
    start_positions: dict[int, int] = field(default_factory=dict)
    worker_offset: int = 0
    verify: str = "sha256"
    max_skip_fraction: float = 0.1
    skipped: SkipCounter = field(default_factory=SkipCounter)

    def __post_init__(self):
        super().__init__()
        if not 0 <= self.max_skip_fraction <= 1:
            raise ValueError(f"max_skip_fraction={self.max_skip_fraction}: expected a fraction in [0, 1]")
        expanded = shard_urls(self.urls)  # local directories -> their tars; braces, pipe: and URLs pass through
        self.shard_list = wds.shardlists.expand_urls(expanded) if isinstance(expanded, str) else list(expanded)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info else 1
        worker = ((info.id if info else 0) + self.worker_offset) % workers
        split, splits = self.rank * workers + worker, self.world_size * workers
        position = self.start_positions.get(worker, 0)
        decode = functools.partial(decode_window, spec=self.spec)
        windows = []
        started = time.perf_counter()
        index = -1  # raw samples this worker has consumed, across epochs, minus one: what ``position`` counts
        for epoch in itertools.count():
            counts = EpochCounts()
            for sample in self.epoch_samples(epoch, split, splits):
                index += 1
                if index < position:  # consumed before the resume: dropped undecoded
                    counts.resumed += 1
                    continue
                if LOST in sample:  # the shard's log line said why; the sample keeps its place in the stream
                    self.skipped.add(1)
                    counts.lost += 1
                    counts.skip(sample["__url__"], f"clip {sample['__key__']!r} lost: {sample[LOST]}")
                    continue
                try:
                    windows.append(decode(sample, random.Random(f"{self.seed}-{split}-{index}")))
                except Wav2VecLayersMismatch:  # not a bad clip: shards made for another model
                    raise
                except Exception as error:  # one bad clip never stops training (too many do: check_epoch)
                    problem = f"clip {sample.get('__key__')!r} in {sample.get('__url__')}: {error}"
                    self.skipped(ClipDecodeError(problem))
                    counts.failed += 1
                    counts.skip(sample.get("__url__"), problem)
                    continue
                counts.windows += 1
                if len(windows) == self.batch_size:
                    batch = collate_windows(windows)
                    batch["position"] = torch.tensor([worker, index + 1])
                    batch["produce_s"] = torch.tensor(time.perf_counter() - started)
                    yield batch
                    windows = []
                    started = time.perf_counter()
            if not counts.resumed:
                self.check_epoch(epoch, split, splits, counts)

    def check_epoch(self, epoch: int, split: int, splits: int, counts: EpochCounts) -> None:
        """Raise ``TrainingDataError`` if the epoch gave no window or skipped more than ``max_skip_fraction``."""
        skipped = counts.failed + counts.lost
        read = counts.windows + skipped
        if counts.windows > 0 and skipped <= self.max_skip_fraction * read:
            return
        shards = self.epoch_shards(epoch, split, splits)
        listed = ", ".join(shards[:10]) + (f" ... ({len(shards) - 10} more)" if len(shards) > 10 else "")
        worst = sorted(counts.bad_shards.items(), key=lambda item: -item[1])[:5]
        raise TrainingDataError(
            f"epoch {epoch} of rank {self.rank}, split {split}/{splits}: "
            f"{'no window: ' if counts.windows == 0 else ''}{skipped} of {read} samples skipped "
            f"({counts.failed} failed to decode, {counts.lost} lost in shards that failed verification or came up "
            f"short), over max_skip_fraction={self.max_skip_fraction}. Shards read: [{listed}]. Most skips in: "
            f"{', '.join(f'{url} ({n})' for url, n in worst)}. First problem: {counts.first_problem}. "
            "Check the shards with `synchrorama validate` (and the window size against the clips' length), "
            "rewrite them by rerunning the preprocess flow, or raise max_skip_fraction"
        )

    def epoch_shards(self, epoch: int, split: int, splits: int) -> list[str]:
        """The shards this split reads in ``epoch``, in reading order: all of them when splitting by sample."""
        shards = list(self.shard_list)
        random.Random(self.seed + epoch).shuffle(shards)
        return shards[split::splits] if len(shards) >= splits else shards

    def epoch_samples(self, epoch: int, split: int, splits: int) -> Iterator[dict[str, Any]]:
        """Undecoded samples of one epoch for this split, shuffled; ``LOST`` placeholders included (they keep
        the positions of the samples a shard did not deliver, so splitting by sample counts each once)."""
        select = functools.partial(_is_wanted, wanted=self.spec.members())
        shards = self.epoch_shards(epoch, split, splits)
        samples = verified_samples(({"url": url} for url in shards), select_files=select, verify=self.verify)
        if len(self.shard_list) < splits:
            samples = (s for i, s in enumerate(samples) if i % splits == split)
        rng = random.Random(f"{self.seed}-{epoch}-{split}")
        count = 0
        for sample in wds.filters._shuffle(samples, self.shuffle_buffer, self.shuffle_buffer, rng=rng) \
                if self.shuffle_buffer > 1 else samples:
            count += 1
            yield sample
        if count == 0:
            raise ValueError(f"rank {self.rank} split {split}/{splits} got no sample from {len(self.shard_list)} "
                             "shards: fewer clips than ranks x workers")

    def raw_samples(self, split: int, splits: int, epochs: int | None = None) -> Iterator[dict[str, Any]]:
        """Undecoded samples for this split, shuffled, epoch after epoch (forever when ``epochs`` is None)."""
        for epoch in itertools.count() if epochs is None else range(epochs):
            yield from self.epoch_samples(epoch, split, splits)


def _is_wanted(file_name: str, *, wanted: frozenset[str]) -> bool:
    _, _, member = os.path.basename(file_name).partition(".")
    return member.lower() in wanted


def _reference_index(rng: random.Random, n_frames: int, start: int, spec: WindowSpec) -> int:
    """A random frame at least ``spec.min_reference_distance`` frames from every generated frame of the window."""
    gap = spec.min_reference_distance
    if gap <= 0:
        return rng.randrange(n_frames)
    first = start if spec.stage == "a2m" else start + spec.motion_frames
    last = first + (spec.motion_frames if spec.stage == "a2m" else spec.clip_frames) - 1
    before, after = max(0, first - gap + 1), max(0, n_frames - (last + gap))  # frames [0, before), [last+gap, n)
    if before + after == 0:
        raise ClipDecodeError(f"{n_frames} frames leave no reference frame {gap} frames away from frames "
                              f"{first}-{last}; lower min_reference_distance or use longer clips")
    k = rng.randrange(before + after)
    return k if k < before else last + gap + (k - before)


def decode_window(sample: dict[str, Any], rng: random.Random, *, spec: WindowSpec) -> dict[str, Any]:
    """One raw WebDataset sample -> one window dict (unbatched shapes of the module docstring)."""
    meta = json.loads(sample[schema.META_MEMBER])
    n_frames = int(meta["n_frames"])
    m, t = spec.motion_frames, spec.clip_frames
    if n_frames < m + t:
        raise ClipDecodeError(f"{n_frames} frames, a window needs {m + t}")
    start = rng.randrange(n_frames - (m + t) + 1)
    reference_index = _reference_index(rng, n_frames, start, spec)
    count = spec.frames
    window: dict[str, Any] = {"first_frame": torch.tensor(start)}
    # The stage's frames: the motion frames for a2m, motion + clip frames otherwise.
    latents = load_npy(sample[LATENTS_MEMBER]) if spec.prefer_cached and LATENTS_MEMBER in sample else None
    if latents is not None and latents.shape[-1] != spec.latent_size:
        latents = None  # cached for another frame size (e.g. 512 px shards, a tiny 32 px model): use the pixels
    if latents is not None:
        latents = torch.from_numpy(latents.astype(np.float32))
        window["latents"] = latents[start:start + count]
        window["reference_latents"] = latents[reference_index]
    else:
        wanted = sorted({*range(start, start + count), reference_index})
        frames = dict(zip(wanted, decode_frames(sample[schema.VIDEO_MEMBER], wanted, spec.image_size), strict=True))
        window["frames"] = torch.stack([frames[i] for i in range(start, start + count)])
        window["reference"] = frames[reference_index]
    if "audio" in spec.needs:
        if spec.prefer_cached and WAV2VEC_MEMBER in sample:
            features = load_npy(sample[WAV2VEC_MEMBER])
            check_wav2vec_layers(meta, features.shape, spec, f"clip {sample.get('__key__')!r} in "
                                 f"{sample.get('__url__')}")
            window["wav2vec"] = torch.from_numpy(features[start:start + count].astype(np.float32))
        speech = sample.get(VOCALS_MEMBER, sample.get(schema.AUDIO_MEMBER))
        audio = decode_wav(speech)
        per_frame = schema.AUDIO_SAMPLES_PER_FRAME
        window["audio"] = audio[start * per_frame:(start + count) * per_frame]
        if len(window["audio"]) != count * per_frame:
            raise ClipDecodeError(f"audio has {len(audio)} samples for {n_frames} frames")
    if "emotion" in spec.needs and EMOTION_MEMBER in sample:
        with np.load(io.BytesIO(sample[EMOTION_MEMBER]), allow_pickle=False) as arrays:
            for name in EMOTION_ARRAYS:  # invalid parts (no speech, no text) are stored as zeros
                window[f"emotion.{name}"] = torch.from_numpy(arrays[name].astype(np.float32))
    if "aus" in spec.needs and AUS_MEMBER in sample:
        window["aus"] = torch.from_numpy(load_npy(sample[AUS_MEMBER]).astype(np.float32))[start + m:start + m + t]
    if "description" in spec.needs and DESCRIPTION_MEMBER in sample:
        window["description"] = torch.from_numpy(load_npy(sample[DESCRIPTION_MEMBER]).astype(np.float32))
    return window


def decode_frames(mp4: bytes, indices: Sequence[int], size: int) -> list[torch.Tensor]:
    """The frames at sorted ``indices`` as uint8 ``(3, size, size)``; stops decoding after the last one."""
    wanted, frames = set(indices), []
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1))
            if i >= indices[-1]:
                break
    if len(frames) != len(indices):
        raise ClipDecodeError(f"mp4 ended before frame {indices[-1]}")
    stacked = torch.stack(frames)
    if stacked.shape[-1] != size:  # area filter: the average of the pixels a target pixel covers
        stacked = F.interpolate(stacked.float(), size=(size, size), mode="area").round().clamp(0, 255).byte()
    return list(stacked)


def collate_windows(windows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack windows; a key missing from any window is dropped (the loop then uses its fallback), and VA
    windows (whose count depends on clip length) are padded by repeating each clip's last window."""
    keys = set.intersection(*(set(w) for w in windows))
    batch = {}
    for key in sorted(keys):
        values = [w[key] for w in windows]
        if key in ("emotion.va_values", "emotion.va_embedding"):
            longest = max(v.shape[0] for v in values)
            values = [torch.cat([v, v[-1:].expand(longest - v.shape[0], *v.shape[1:])]) for v in values]
        batch[key] = torch.stack(values)
    return batch


def data_loader(dataset: TrainingWindows, num_workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader over already-batched windows (each item is one worker's batch).

    Workers start from a fork server, not a plain fork: a process that already runs threads (a Prefect flow, a
    notebook, TensorBoard's writer) can hand a forked child a lock held by one of them, and that child then dies.
    """
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                       persistent_workers=False, pin_memory=torch.cuda.is_available(),
                                       prefetch_factor=4 if num_workers else None,
                                       multiprocessing_context="forkserver" if num_workers else None)


__all__ = ["EMOTION_ARRAYS", "STAGE_NEEDS", "TrainingDataError", "TrainingWindows", "Wav2VecLayersMismatch",
           "WindowSpec", "collate_windows", "data_loader", "decode_window", "stored_wav2vec_layers"]

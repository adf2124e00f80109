"""The visual and semantic stages inside the preprocess flow (tiny profile, VAE latents on): every kept clip gets
an AU row per frame, one description with its prompt and model, one CLIP text embedding and latents that decode
back to its frames, in the tables and in the shard."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from preprocess.pipeline import load_model
from preprocess.run.settings import DEFAULT_CAPTION_PROMPT as DEFAULT_PROMPT
from preprocess.run.settings import load_settings
from preprocess.visual.action_units import GEOMETRIC_AU_NAMES, GeometricAUs
from preprocess.visual.latents import psnr
from shards.reader import clip_dataset
from shards.schema import AUS_MEMBER, DESCRIPTION_MEMBER, LATENTS_MEMBER, OPTIONAL_MEMBERS, REQUIRED_MEMBERS
from shards.tables import ACTION_UNITS_TABLE, DESCRIPTIONS_TABLE, TABLES_DIR
from shards.validate import validate_shards

KEPT = {"talk": 100, "quiet": 100}  # clip id -> frames (4 s at 25 fps)
MIN_TINY_VAE_PSNR_DB = 22.0  # the briefly trained tiny VAE; an untrained one stays far below
TINY_TEXT_HIDDEN = 32  # hidden size of the tiny SD text encoder (tiny_models.vision)


def _rows(out, table) -> list[dict]:
    return pq.read_table(out / TABLES_DIR / table).to_pylist()


def test_every_kept_clip_has_an_au_row_per_frame(tiny_feature_run):
    _, out, summary, _ = tiny_feature_run
    assert summary["n_kept"] == len(KEPT)
    rows = _rows(out, ACTION_UNITS_TABLE)
    for clip_id, n_frames in KEPT.items():
        frames = [row for row in rows if row["clip_id"] == clip_id]
        assert [row["frame"] for row in frames] == list(range(n_frames))
        assert frames[-1]["time_s"] == pytest.approx((n_frames - 1) / 25)
        # the synthetic face is found on every frame, so every AU has a number
        assert all(isinstance(row[name], float) for row in frames for name in GEOMETRIC_AU_NAMES)
        assert {row["model"] for row in frames} == {GeometricAUs.name}
    # the tables reference's example query runs: mean lips-part per clip
    query = f"SELECT clip_id, avg(AU25) FROM '{out}/tables/action_units.parquet' GROUP BY clip_id ORDER BY clip_id"
    assert [row[0] for row in duckdb.sql(query).fetchall()] == sorted(KEPT)


def test_every_kept_clip_has_one_description_with_its_prompt_and_model(tiny_feature_run):
    _, out, summary, _ = tiny_feature_run
    rows = _rows(out, DESCRIPTIONS_TABLE)
    assert sorted(row["clip_id"] for row in rows) == sorted(KEPT)
    for row in rows:
        # the tiny Qwen2.5-VL writes (meaningless) text: its decoder weights are drawn wide so that it does not
        # just echo the prompt's last token, a newline (which would leave an empty description)
        assert isinstance(row["text"], str) and row["text"].strip() and row["status"] == "ok"
        assert row["prompt"] == DEFAULT_PROMPT
        assert row["model"] == ".models/tiny/captioner" and row["embedding_model"] == ".models/tiny/sd15"
        assert row["n_frames"] == load_settings("tiny").visual.description.n_frames
        assert row["embedding_shape"] == [77, TINY_TEXT_HIDDEN]
    assert summary["models"]["captioning"] == ".models/tiny/captioner"
    assert "MEAN NOTHING" in summary["warning"] and "captioning" in summary["warning"]


def test_shard_samples_carry_aus_text_embedding_and_latents_that_decode_back(tiny_feature_run):
    _, out, _, overrides = tiny_feature_run
    settings = load_settings("tiny", overrides)
    vae = load_model("vae", settings.models.vae).model  # the same VAE, through the same loading code
    # the validator checks every feature member's dtype (aus float32, clip_text and latents float16) and length
    assert validate_shards(out / "shards") == []
    seen = set()
    for clip in clip_dataset(out / "shards", members=REQUIRED_MEMBERS + OPTIONAL_MEMBERS, decode_video=True):
        meta, n_frames = clip["meta"], clip["meta"]["n_frames"]
        aus = clip[AUS_MEMBER.removesuffix(".npy")]
        assert aus.shape == (n_frames, len(GEOMETRIC_AU_NAMES))
        assert meta["action_units"]["names"] == list(GEOMETRIC_AU_NAMES)
        text = clip[DESCRIPTION_MEMBER.removesuffix(".npy")]
        assert text.shape == (77, TINY_TEXT_HIDDEN)
        assert meta["description"]["prompt"] == DEFAULT_PROMPT
        latents = clip[LATENTS_MEMBER.removesuffix(".npy")]
        assert latents.shape == (n_frames, 4, 64, 64)
        assert meta["latents"]["scaling_factor"] == vae.scaling_factor
        assert meta["latents"]["model"] == ".models/tiny/sd15"
        # the latents decode back, with the same VAE, to frames close to the clip's own
        every_tenth = slice(0, n_frames, 10)
        decoded = vae.decode(latents[every_tenth].numpy())
        quality = psnr(decoded, np.asarray(clip["video"])[every_tenth].transpose(0, 2, 3, 1))
        print(f"{clip['clip_id']}: latents decode back at PSNR {quality:.1f} dB (tiny VAE)")
        assert quality > MIN_TINY_VAE_PSNR_DB
        seen.add(clip["clip_id"])
    assert seen == set(KEPT)

"""A stage declares itself, and the executor runs every stage by the same rules.

Adding a stage takes two edits: its module (here the ``MOUTH_OPENING`` declaration below stands for it) and its
line in ``preprocess.pipeline.STAGES`` (here one ``monkeypatch`` of the table). Nothing else: the executor, the
groups, the partition keys and the preflight all read the table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from preprocess import pipeline
from preprocess.datasets.video_files import folder_candidates
from preprocess.run import executor
from preprocess.run.job import Workspace
from preprocess.run.partitions import Partition, partition_key
from preprocess.run.settings import load_settings
from preprocess.run.stage import GROUPS, Split, Stage
from preprocess.video.faces import LANDMARKS_FILE

# the upper and the lower inner lip of MediaPipe's face mesh
UPPER_LIP, LOWER_LIP = 13, 14
SETTINGS = load_settings("tiny", {"visual": {"description": {"enabled": False}, "latents": {"enabled": False}},
                                  "filters": {"min_speech_fraction": 0.0}})


def _mouth_opening(piece, settings, workspace, out_dir: Path) -> dict:
    landmarks = np.load(Path(piece.files_dir) / LANDMARKS_FILE)
    gap = np.abs(landmarks[:, LOWER_LIP, 1] - landmarks[:, UPPER_LIP, 1])
    return {"median_gap": float(np.nanmedian(gap)), "n_frames": int(len(gap))}


# The whole of a new stage: a name, a version, its group, what its output depends on, and its code.
MOUTH_OPENING = Stage(name="mouth_opening", version=1, group="visual", run=_mouth_opening,
                      key_parts=lambda piece, settings, workspace: [piece.content_key])


def _crash(piece, settings, workspace, out_dir: Path) -> dict:
    raise ValueError("a bad clip")


def test_the_executor_stays_short():
    lines = len(Path(executor.__file__).read_text().splitlines())
    print(f"preprocess/run/executor.py: {lines} lines")
    assert lines <= 300


def test_every_stage_in_the_table_declares_itself():
    names = [stage.name for stage in pipeline.STAGES]
    assert len(names) == len(set(names))
    assert [stage.group for stage in pipeline.STAGES] == sorted(
        (stage.group for stage in pipeline.STAGES), key=GROUPS.index), "groups run in order"
    assert isinstance(pipeline.stages_of("video")[-1], Split), "the video group ends with the split into pieces"
    for stage in pipeline.cached_stages().values():
        assert stage.version >= 1 and stage.group in GROUPS
        if stage.run_many is not None:
            assert stage.group != "video", "batching is across a partition's pieces"


@pytest.fixture(scope="module")
def pieces(tmp_path_factory, frontal_video):
    raw = tmp_path_factory.mktemp("raw")
    (raw / "talk.mp4").symlink_to(frontal_video)
    workspace = Workspace(tmp_path_factory.mktemp("out"))
    outcomes = pipeline.run_video_group(folder_candidates(raw), SETTINGS, workspace)
    assert [piece.kept for piece in outcomes] == [True], [piece.rejection for piece in outcomes]
    return outcomes, workspace


def test_a_stage_added_in_one_line_runs_cached_versioned_and_guarded(pieces, monkeypatch):
    outcomes, workspace = pieces
    candidates = tuple(piece.job.candidate for piece in outcomes)
    key_before = partition_key(Partition(0, candidates), SETTINGS)

    monkeypatch.setattr(pipeline, "STAGES", (*pipeline.STAGES, MOUTH_OPENING))  # the one line in the table

    assert pipeline.stage_versions()["mouth_opening"] == 1
    assert partition_key(Partition(0, candidates), SETTINGS) != key_before, "a new stage redoes the partitions"
    [piece] = pipeline.run_model_group("visual", outcomes, SETTINGS, workspace)
    entry = piece.features["mouth_opening"]
    assert entry["n_frames"] == piece.frames[1] - piece.frames[0] and entry["median_gap"] >= 0
    assert Path(entry["dir"]) == workspace.cache.entry_dir("mouth_opening", entry["key"])
    assert piece.timings[-1].stage == "mouth_opening" and not piece.timings[-1].cached

    [again] = pipeline.run_model_group("visual", outcomes, SETTINGS, workspace)
    assert again.features["mouth_opening"] == entry and again.timings[-1].cached

    # the same failure rules as every other stage: a crash rejects the clip ("error", not cached), nothing stops
    crashing = Stage(name="mouth_opening", version=2, group="visual", run=_crash,
                     key_parts=MOUTH_OPENING.key_parts)
    monkeypatch.setattr(pipeline, "STAGES", (*pipeline.STAGES[:-1], crashing))
    [failed] = pipeline.run_model_group("visual", outcomes, SETTINGS, workspace)
    assert (failed.rejection.stage, failed.rejection.reason) == ("mouth_opening", "error")
    assert "a bad clip" in failed.rejection.detail

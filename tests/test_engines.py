"""The preprocess flow on a distributed engine (flows/engines.py): Dask and Ray clusters of 2 local worker processes
give the same shards and tables as the default thread pool, GPU stage tasks request a GPU from each engine, and
no worker process outlives the run.

Measured on 2 busy cores (3 generated 4 s clips, tiny profile): the thread-pool run about 40 s, the Dask run about
90-120 s, the Ray run about 50-75 s (each worker process loads its own models). The Dask and Ray tests skip when
their extra is not installed (``scripts/install.sh`` installs both)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

from flows.engines import build_task_runner, engine_workers, gpu_resources
from preprocess.run.settings import EngineSettings, load_settings, machine_cores
from shards.tables import CLIPS_TABLE, STAGE_TIMINGS_TABLE, TABLES_DIR, TIMING_COLUMNS
from synchrorama.sample_data import make_talking_video

# Wall-clock columns differ between any two runs, whatever the engine; everything else must match byte for byte.
WALL_TIME_COLUMNS = {CLIPS_TABLE: list(TIMING_COLUMNS), STAGE_TIMINGS_TABLE: ["seconds"]}


@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    make_talking_video(raw / "talk_a.mp4", seconds=4.0)
    make_talking_video(raw / "talk_b.mp4", seconds=4.0, variant=1)
    make_talking_video(raw / "empty_room.mp4", layout="none", seconds=4.0)  # rejected no_face: a rejection row too
    return raw


@pytest.fixture(scope="module")
def threads_run(raw_folder, tmp_path_factory):
    from flows.preprocess import preprocess

    out = tmp_path_factory.mktemp("threads")
    preprocess(dataset="folder", raw_dir=str(raw_folder), out_dir=str(out), profile="tiny")
    return out


def _published(out: Path) -> dict[str, object]:
    """Every file under shards/ and tables/: its bytes, or for a table with wall-time columns its rows without
    them."""
    published = {}
    for folder in ("shards", TABLES_DIR):
        for path in sorted((out / folder).rglob("*")):
            if not path.is_file():
                continue
            name = str(path.relative_to(out))
            if path.name in WALL_TIME_COLUMNS:
                published[name] = pq.read_table(path).drop_columns(WALL_TIME_COLUMNS[path.name]).to_pylist()
            else:
                published[name] = path.read_bytes()
    return published


def _child_processes() -> set[int]:
    """This process's descendants, less multiprocessing's resource tracker: one per process, started on first
    use of multiprocessing (by the local Dask cluster) and ending with this process, not with a run."""
    children = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if "multiprocessing.resource_tracker" not in " ".join(child.cmdline()):
                children.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return children


def _wait_for_no_new_children(before: set[int], timeout_s: float = 30.0) -> list[str]:
    """Processes started since ``before`` that are still alive after ``timeout_s`` (a cluster's shutdown is
    asynchronous: workers exit shortly after the flow returns)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = []
        for pid in _child_processes() - before:
            try:
                left.append(" ".join(psutil.Process(pid).cmdline())[:200])
            except psutil.NoSuchProcess:
                pass
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _run_on_engine(kind: str, raw_folder: Path, out: Path) -> dict:
    from flows.preprocess import preprocess

    before = _child_processes()
    summary = preprocess(dataset="folder", raw_dir=str(raw_folder), out_dir=str(out), profile="tiny",
                         overrides={"engine": {"kind": kind, "workers": 2}})
    assert _wait_for_no_new_children(before) == [], f"{kind} worker processes outlived the run"
    return summary


def test_dask_cluster_of_two_workers_gives_the_threads_outputs(raw_folder, threads_run, tmp_path):
    pytest.importorskip("prefect_dask")
    out = tmp_path / "dask"
    summary = _run_on_engine("dask", raw_folder, out)
    assert summary["n_kept"] == 2 and summary["n_rejected"] == 1
    reference, published = _published(threads_run), _published(out)
    assert any(name.endswith(".tar") for name in published)
    assert sorted(published) == sorted(reference)
    assert [name for name in published if published[name] != reference[name]] == []


def test_ray_cluster_of_two_workers_gives_the_threads_outputs(raw_folder, threads_run, tmp_path):
    pytest.importorskip("prefect_ray")
    out = tmp_path / "ray"
    _run_on_engine("ray", raw_folder, out)
    reference, published = _published(threads_run), _published(out)
    assert sorted(published) == sorted(reference)
    assert [name for name in published if published[name] != reference[name]] == []


@task
def _where_it_ran() -> dict:
    """The process a task ran in, and the resources its engine granted it."""
    granted: dict = {"pid": os.getpid()}
    try:
        import distributed
        from distributed.worker import thread_state

        worker = distributed.get_worker()
        granted["dask"] = worker.state.tasks[thread_state.key].resource_restrictions or {}
    except (ImportError, ValueError):
        pass  # not in a Dask worker
    try:
        import ray

        if ray.is_initialized():
            granted["ray"] = ray.get_runtime_context().get_assigned_resources()
    except ImportError:
        pass
    return granted


def _cpu_and_gpu_task(engine: EngineSettings) -> tuple[dict, dict]:
    @flow(task_runner=build_task_runner(engine))
    def submit_both() -> tuple[dict, dict]:
        cpu = _where_it_ran.submit()
        with gpu_resources(engine):
            gpu = _where_it_ran.submit()
        return cpu.result(), gpu.result()

    return submit_both()


def test_gpu_tasks_request_a_gpu_from_dask(tmp_path):
    pytest.importorskip("prefect_dask")
    before = _child_processes()
    # a CPU machine: the local cluster's workers declare the GPU resource because a GPU task asks for one
    cpu, gpu = _cpu_and_gpu_task(EngineSettings(kind="dask", workers=1, gpus_per_gpu_task=1))
    assert cpu["pid"] != os.getpid() and gpu["pid"] != os.getpid()  # in worker processes
    assert cpu["dask"] == {} and gpu["dask"] == {"GPU": 1.0}
    assert _wait_for_no_new_children(before) == []


def test_gpu_tasks_request_a_gpu_from_ray():
    ray = pytest.importorskip("ray")
    pytest.importorskip("prefect_ray")
    before = _child_processes()
    # Ray counts real GPUs; here a local instance declares one, which the runner then joins instead of starting its own
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False)
    try:
        cpu, gpu = _cpu_and_gpu_task(EngineSettings(kind="ray", workers=2, gpus_per_gpu_task=1))
    finally:
        ray.shutdown()
    assert "GPU" not in cpu["ray"] and gpu["ray"]["GPU"] == 1.0
    assert _wait_for_no_new_children(before) == []


def test_threads_engine_and_defaults():
    settings = load_settings("tiny")
    assert settings.engine.kind == "threads" and settings.workers == machine_cores()
    runner = build_task_runner(settings.engine, settings.workers)
    assert isinstance(runner, ThreadPoolTaskRunner) and runner._max_workers == machine_cores()
    # engine.workers wins over the top-level count; gpu_resources is a no-op on threads even when GPUs are asked for
    engine = load_settings("tiny", {"workers": 3, "engine": {"workers": 5, "gpus_per_gpu_task": 1}}).engine
    assert engine_workers(engine, 3) == 5
    with gpu_resources(engine):
        pass
    import torch

    assert load_settings().engine.gpus_per_gpu_task == (1.0 if torch.cuda.is_available() else 0.0)


def test_cluster_address_is_used_instead_of_a_local_cluster():
    pytest.importorskip("prefect_dask")
    runner = build_task_runner(EngineSettings(kind="dask", address="tcp://10.0.0.5:8786"))
    assert runner.address == "tcp://10.0.0.5:8786" and runner.cluster_kwargs == {}
    local = build_task_runner(EngineSettings(kind="dask", workers=2, gpus_per_gpu_task=0))
    assert local.cluster_kwargs["n_workers"] == 2 and "resources" not in local.cluster_kwargs

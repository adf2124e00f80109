"""The engine the preprocess flow's stage tasks run on, chosen by ``settings.engine`` (``EngineSettings``).

* ``threads`` (default): Prefect's ``ThreadPoolTaskRunner`` in the flow's own process. ffmpeg and MediaPipe
  release the GIL, and every model is loaded once for the whole run.
* ``dask``: prefect-dask's ``DaskTaskRunner``, on a local cluster of ``workers`` worker processes with one thread
  each (started and closed with the run), or on the scheduler at ``engine.address``.
* ``ray``: prefect-ray's ``RayTaskRunner``, on a local Ray instance with ``workers`` CPUs, or on the cluster at
  ``engine.address``.

Dask and Ray run each task in a worker process: the task, its arguments and its result are pickled, every worker
loads the models it needs once (``preprocess.run.model_loading``), and every worker must see ``out_dir`` at the same
path (shared storage on a multi-machine cluster, docs/scale.md). dask, distributed and ray are imported only when
selected, so the default engine needs neither installed.

The workers of a local cluster use as many torch threads as the flow's own process (``worker_thread_environment``):
a CPU model's float results change in the last bits with its thread count (measured between 1 and 2 threads:
emotion outputs by about 1e-9, 0.06% of the fp16 wav2vec values by one step), and the outputs must not depend on
the engine. Dask and Ray would
otherwise start their workers with ``OMP_NUM_THREADS=1``.

GPU stage tasks ask the engine for a GPU through ``gpu_resources``, wrapped around their ``.submit()``/``.map()``::

    with gpu_resources(settings.engine):
        features = wav2vec_task.submit(partition, settings, out_dir)

Dask then runs them only on workers that declare a ``GPU`` resource (a local cluster declares
``gpus_per_gpu_task`` on each worker, so each runs one GPU task at a time; ``dask worker --resources GPU=1``
elsewhere), and Ray only where a GPU is free (it counts the machine's GPUs itself).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from preprocess.run.settings import EngineSettings, machine_cores


def engine_workers(engine: EngineSettings, default_workers: int | None = None) -> int:
    """Threads or local worker processes: ``engine.workers``, else ``default_workers`` (the settings' top-level
    ``workers``), else the machine's cores."""
    return engine.workers or default_workers or machine_cores()


def worker_thread_environment() -> dict[str, str]:
    """Environment variables that give a worker process this process's torch intra-op thread count (torch reads
    OMP_NUM_THREADS at start; MKL and OpenBLAS are set alike for numpy)."""
    import torch  # the flow's process has imported it already (the stages' models)

    threads = str(torch.get_num_threads())
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}


def local_dask_cluster(**cluster_kwargs: Any) -> Any:
    """A ``distributed.LocalCluster`` whose worker processes start with ``worker_thread_environment()`` instead of
    Dask's ``OMP_NUM_THREADS=1`` (its nannies read ``distributed.nanny.pre-spawn-environ`` when created)."""
    import dask
    import distributed

    environ = {f"distributed.nanny.pre-spawn-environ.{name}": value
               for name, value in worker_thread_environment().items()}
    with dask.config.set(environ):
        return distributed.LocalCluster(**cluster_kwargs)


def build_task_runner(engine: EngineSettings, default_workers: int | None = None) -> TaskRunner:
    """A fresh (not yet started) task runner for ``engine``; the flow starts and closes it, and with it any local
    cluster it creates. ``default_workers``: the settings' top-level ``workers``, used when ``engine.workers`` is
    None."""
    workers = engine_workers(engine, default_workers)
    if engine.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if engine.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if engine.address:
            return DaskTaskRunner(address=engine.address)
        cluster = {
            "n_workers": workers,
            # one task per worker process at a time: the stages are CPU-heavy themselves (ffmpeg, MediaPipe, torch)
            "threads_per_worker": 1,
            "processes": True,
            # no dashboard (it needs bokeh, and nothing here reads it)
            "dashboard_address": None,
        }
        if engine.gpus_per_gpu_task > 0:
            # a task annotated with resources={"GPU": n} waits for a worker declaring at least n; declared only when
            # GPU tasks request it, so that a CPU machine's workers carry no resource nobody asks for
            cluster["resources"] = {"GPU": engine.gpus_per_gpu_task}
        return DaskTaskRunner(cluster_class=local_dask_cluster, cluster_kwargs=cluster)
    if engine.kind == "ray":
        from prefect_ray import RayTaskRunner

        if engine.address:
            return RayTaskRunner(address=engine.address)
        # Ray counts the machine's GPUs itself; num_cpus bounds the tasks running at once (each asks for 1 CPU).
        # The dashboard is off: it starts extra processes and a web server that nothing here reads.
        return RayTaskRunner(init_kwargs={"num_cpus": workers, "include_dashboard": False,
                                          "runtime_env": {"env_vars": worker_thread_environment()}})
    raise ValueError(f"unknown engine kind {engine.kind!r}; choose threads, dask or ray")


@contextmanager
def gpu_resources(engine: EngineSettings) -> Iterator[None]:
    """Tasks submitted inside this block request ``engine.gpus_per_gpu_task`` GPUs from the engine (Dask: worker
    resource ``GPU``; Ray: ``num_gpus``). A no-op for threads (one process: Prefect's concurrency limit decides) and
    when no GPU is requested."""
    gpus = engine.gpus_per_gpu_task
    if engine.kind == "threads" or gpus <= 0:
        yield
    elif engine.kind == "dask":
        import dask

        with dask.annotate(resources={"GPU": gpus}):
            yield
    elif engine.kind == "ray":
        from prefect_ray.context import remote_options

        with remote_options(num_gpus=gpus):
            yield
    else:
        raise ValueError(f"unknown engine kind {engine.kind!r}; choose threads, dask or ray")

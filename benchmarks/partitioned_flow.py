"""The preprocess flow at dataset scale through a served deployment: task runs, wall time per clip, and the
orchestration overhead (issue 13).

    python benchmarks/partitioned_flow.py --clips 1000 --raw /data/bench/raw1000 --work /data/bench/run1000
    python benchmarks/partitioned_flow.py --clips 40                  # a quick look

Generates ``--clips`` distinct 4 s talking clips (``synchrorama.sample_data``; kept in ``--raw`` and reused by a
later call), starts a Prefect server on SQLite with its own PREFECT_HOME, serves the deployments with the tiny
profile (``flows.serve``) and runs ``prefect deployment run preprocess/folder --watch`` on them, as a user would.
Then it reads back from the server how many task runs the flow run and its subflow made, and from the tables how
much stage work was done (the stage_timings seconds of stages computed by this run, summed):

- overhead = wall time - stage work / workers: what orchestration (Prefect's API calls, task submission,
  scheduling, the publish step, model loading) adds to the stages' own work when it is spread over the workers.

The tiny profile's models are random, so only the orchestration figures mean anything. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from synchrorama.prefect_server import start_server  # noqa: E402
from synchrorama.sample_data import make_talking_video  # noqa: E402

PREFECT = str(Path(sys.executable).with_name("prefect"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def generate(raw: Path, n_clips: int, seconds: float) -> float:
    started = time.perf_counter()
    for number in range(n_clips):
        path = raw / f"clip{number:04d}.mp4"
        if not path.exists():
            partial = path.with_name(f".partial-{path.name}")
            make_talking_video(partial, layout="single", seconds=seconds, variant=number)
            partial.rename(path)
    return time.perf_counter() - started


def task_runs(api_url: str, run_id: str) -> list:
    os.environ["PREFECT_API_URL"] = api_url
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[UUID(run_id)])))
        ids = [UUID(run_id), *(child.id for child in children)]
        runs, offset = [], 0
        while True:
            page = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)),
                                         limit=200, offset=offset)
            runs += page
            offset += len(page)
            if len(page) < 200:
                return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--raw", type=Path, default=None, help="generated clips (default: WORK/raw)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/synchrorama-bench/partitioned"))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-clips", type=int, default=None, help="partitions.max_clips (default: the setting's)")
    args = parser.parse_args()
    work = args.work.resolve()
    raw = (args.raw or work / "raw").resolve()
    out = work / "out"
    generation_s = generate(raw, args.clips, args.seconds)

    home = work / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    os.environ.update(PREFECT_HOME=str(home), HF_HUB_OFFLINE="1")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_API_URL": api_url}
    server = start_server(work / "server.log", port=port, timeout_s=300)
    serving = None
    try:
        deadline = time.monotonic() + 300
        serving = subprocess.Popen([sys.executable, "-m", "flows.serve", "--profile", "tiny"], cwd=REPO, env=env,
                                   stdout=open(work / "serve.log", "wb"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        while subprocess.run([PREFECT, "deployment", "inspect", "preprocess/folder"], cwd=REPO, env=env,
                             capture_output=True).returncode != 0:
            if time.monotonic() > deadline or serving.poll() is not None:
                raise SystemExit(f"the deployments were not served; see {work / 'serve.log'}")
            time.sleep(1)
        overrides = {"workers": args.workers}
        if args.max_clips:
            overrides["partitions"] = {"max_clips": args.max_clips}
        command = [PREFECT, "deployment", "run", "preprocess/folder", "--watch", "--watch-timeout", "86400",
                   "-p", f"raw_dir={raw}", "-p", f"out_dir={out}", "-p", f"overrides={json.dumps(overrides)}"]
        started = time.perf_counter()
        finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        wall_s = time.perf_counter() - started
        if finished.returncode != 0:
            raise SystemExit(f"the deployment run failed:\n{finished.stdout[-3000:]}\n{finished.stderr[-3000:]}")
        summary = json.loads((out / "summary.json").read_text())
        runs = task_runs(api_url, summary["run_id"])
    finally:
        if serving is not None:
            _stop(serving)
        _stop(server)

    timings = pq.read_table(out / "tables" / "stage_timings.parquet").to_pylist()
    stage_work_s = sum(row["seconds"] for row in timings if not row["cached"])
    by_group: dict[str, int] = {}
    for run in runs:
        group = run.name.split("-p")[0] if "-p" in run.name else run.name.rsplit("-", 1)[0]
        by_group[group] = by_group.get(group, 0) + 1
    print(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "clips": args.clips, "clip_seconds": args.seconds, "kept": summary["n_kept"],
        "partitions": summary["n_partitions"], "workers": args.workers,
        "task_runs": len(runs), "task_runs_per_partition": round(len(runs) / summary["n_partitions"], 2),
        "task_runs_by_name": dict(sorted(by_group.items())),
        "wall_s": round(wall_s, 1), "wall_s_per_clip": round(wall_s / args.clips, 3),
        "stage_work_s": round(stage_work_s, 1),
        "overhead_s": round(wall_s - stage_work_s / args.workers, 1),
        "overhead_s_per_clip": round((wall_s - stage_work_s / args.workers) / args.clips, 3),
        "generation_s": round(generation_s, 1),
    }, indent=1))


if __name__ == "__main__":
    main()

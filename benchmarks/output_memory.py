"""Peak memory of the output-writing step (the publish: shards and tables from the written partitions) for a
small and a large number of clips (issue 13: it must not grow with the dataset).

    python benchmarks/partitioned_flow.py --clips 1000 --work /data/bench/run1000   # makes the partitions
    python benchmarks/output_memory.py --out /data/bench/run1000/out --clips 100 1000

Each measurement runs in a fresh process: it imports the writer, notes its peak RSS (the baseline: Python, numpy,
pyarrow, torch through the stage modules), then publishes the first partitions of ``--out`` (in partition order)
until they hold the asked number of clips, into a scratch out_dir next to it (the shards are hard-linked, the
tables concatenated one partition at a time), and reports its peak RSS again. The difference is what publishing
those clips cost in memory. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path
    from preprocess.run.settings import load_settings
    from preprocess.run.outputs import PARTITION_MARKER, publish_partitions

    out, scratch, wanted = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    parts = []
    for marker in (out / "work" / "partitions").glob("*/" + PARTITION_MARKER):
        parts.append((marker.parent, json.loads(marker.read_text())))
    parts.sort(key=lambda part: part[1]["name"])
    chosen, clips = [], 0
    for part in parts:
        if clips >= wanted:
            break
        chosen.append(part)
        clips += part[1]["n_clips"]
    started = time.perf_counter()
    summary, _ = publish_partitions(chosen, [], load_settings("tiny", dataset="folder"), scratch, run_id="bench",
                                    extra={})
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"clips": summary.n_clips, "partitions": len(chosen), "shards": summary.n_shards,
                      "publish_s": round(seconds, 2), "baseline_rss_mib": round(baseline_kib / 1024, 1),
                      "peak_rss_mib": round(peak_kib / 1024, 1),
                      "publish_rss_mib": round((peak_kib - baseline_kib) / 1024, 1)}))
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="an out_dir whose work/partitions are written")
    parser.add_argument("--clips", type=int, nargs="+", default=[100, 1000])
    args = parser.parse_args()
    out = args.out.resolve()
    rows = []
    for clips in args.clips:
        scratch = out.parent / f"publish-{clips}-{os.getpid()}"
        try:
            started = time.perf_counter()
            child = subprocess.run([sys.executable, "-c", CHILD, str(out), str(scratch), str(clips)], cwd=REPO,
                                   capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if child.returncode != 0:
                raise SystemExit(child.stderr[-3000:])
            rows.append({**json.loads(child.stdout.strip().splitlines()[-1]),
                         "process_s": round(time.perf_counter() - started, 1)})
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores", "runs": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Serve the ``preprocess`` deployments: ``preprocess/hdtf``, ``preprocess/vfhq``, ``preprocess/mead`` and
``preprocess/folder`` (the same flow with other defaults). Needs a running Prefect server
(``PREFECT_API_URL``); ``synchrorama serve`` starts one when none is configured, then runs this module.

Each run triggered with ``prefect deployment run preprocess/<name>`` executes in a fresh subprocess. Up to
``--limit`` runs go at once, so a double trigger of one deployment is easy: the second run on an out_dir fails at
once with ``OutputLocked`` (the flow holds the out_dir's lock for the whole run) and the first goes on untouched.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import serve

from flows.preprocess import preprocess

# name -> (dataset, extra default parameters, description)
DEPLOYMENTS: dict[str, tuple[str, dict, str]] = {
    "hdtf": ("hdtf", {}, "HDTF: the 15 annotation files plus downloaded Name.mp4 videos"),
    "vfhq": ("vfhq", {}, "VFHQ: a folder tree of clips"),
    "mead": ("mead", {"pattern": "**/front/**/*"}, "MEAD: frontal-camera videos of a folder tree"),
    "folder": ("folder", {}, "Any folder tree of videos (mp4, mov, mkv, webm), e.g. in-the-wild clips"),
}


def build_deployments(raw_root: Path, out_root: Path, profile: str):
    return [
        preprocess.to_deployment(
            name=name,
            description=description,
            tags=["preprocess", dataset],
            parameters={"dataset": dataset, "raw_dir": str(raw_root / name), "out_dir": str(out_root / name),
                        "profile": profile, **extra},
        )
        for name, (dataset, extra, description) in DEPLOYMENTS.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw-root", type=Path, default=Path("data/raw"),
                        help="default raw_dir of deployment NAME is RAW_ROOT/NAME")
    parser.add_argument("--out-root", type=Path, default=Path("out"),
                        help="default out_dir of deployment NAME is OUT_ROOT/NAME")
    parser.add_argument("--profile", default="default", help="default settings profile (default or tiny)")
    parser.add_argument("--limit", type=int, default=2, help="flow runs executed at the same time")
    args = parser.parse_args()
    serve(*build_deployments(args.raw_root.resolve(), args.out_root.resolve(), args.profile), limit=args.limit)


if __name__ == "__main__":
    main()

"""``synchrorama``: the user's commands for the SynchroRaMa data pipeline and model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

import tiny_models
from preprocess.run.model_loading import register_tiny_builder

# The tiny profile's models are built on first use by whatever command needs them (run, generate, evaluate, ...).
register_tiny_builder(tiny_models.BUILDER)

app = typer.Typer(help="SynchroRaMa: preprocess talking-face datasets into shards and tables, and build the model.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
console = Console()


@app.command("sample-data")
def sample_data(
    out: Path = typer.Argument(Path("sample_data/hdtf"), help="where to write the sample HDTF dataset"),
    overwrite: bool = typer.Option(False, help="regenerate even if it exists"),
) -> None:
    """Generate the small sample dataset in HDTF's real layout (annotation files + Name.mp4 videos)."""
    from synchrorama.sample_data import make_sample_hdtf

    path = make_sample_hdtf(out, overwrite=overwrite)
    console.print(f"sample HDTF dataset in [bold]{path}[/bold]")


@app.command("run")
def run(
    raw_dir: Path = typer.Option(..., help="videos (and, for HDTF, optionally the annotation files)"),
    out_dir: Path = typer.Option(..., help="where shards/, tables/ and the work cache go"),
    dataset: str = typer.Option("hdtf", help="hdtf, vfhq, mead or folder"),
    profile: str = typer.Option("default", help="settings profile: default (real models) or tiny"),
    annotations_dir: Optional[Path] = typer.Option(None, help="HDTF annotation files if not in raw_dir"),
    pattern: str = typer.Option("**/*", help="glob of videos under raw_dir (folder datasets)"),
    overrides: str = typer.Option("{}", help='settings overrides as JSON, e.g. \'{"filters": {"max_abs_yaw_deg": 30}}\''),
    limit: Optional[int] = typer.Option(None, help="only the first N candidates (refused on an out_dir that holds a "
                                         "published full dataset, unless --publish-subset)"),
    publish_subset: bool = typer.Option(False, help="with --limit: replace a published full dataset with the subset"),
) -> None:
    """Run the preprocess flow in this process (no server needed; Prefect starts a temporary one)."""
    from flows.preprocess import preprocess

    summary = preprocess(dataset=dataset, raw_dir=str(raw_dir), out_dir=str(out_dir), profile=profile,
                         annotations_dir=str(annotations_dir) if annotations_dir else None, pattern=pattern,
                         overrides=json.loads(overrides), limit=limit, publish_subset=publish_subset)
    console.print_json(data=summary)


@app.command("download-hdtf")
def download_hdtf(
    out: Path = typer.Option(..., help="folder for the Name.mp4 videos"),
    annotations_dir: Path = typer.Option(Path(__file__).resolve().parent.parent / "data" / "hdtf_annotations",
                                         help="HDTF annotation files (url lists)"),
    name: Optional[list[str]] = typer.Option(None, help="only these video names (repeatable)"),
) -> None:
    """Optional: download HDTF's videos from YouTube (needs the 'download' extra: yt-dlp, and the network)."""
    from preprocess.datasets.download import download_hdtf_videos

    statuses = download_hdtf_videos(annotations_dir, out, name)
    for video, status in statuses.items():
        # names are the url files' text: printed as text (never rich markup), escaped when not printable, one line
        shown = video if video.isprintable() else repr(video)
        console.print(Text(f"{shown}: {status}"), soft_wrap=True)


@app.command("serve")
def serve_command(
    raw_root: Path = typer.Option(Path("data/raw"), help="default raw_dir of deployment NAME is RAW_ROOT/NAME"),
    out_root: Path = typer.Option(Path("out"), help="default out_dir of deployment NAME is OUT_ROOT/NAME"),
    profile: str = typer.Option("default", help="default settings profile of the deployments"),
    server_log: Path = typer.Option(Path(".prefect/server.log"), help="log of the Prefect server started here"),
) -> None:
    """Serve the deployments preprocess/{hdtf,vfhq,mead,folder}; starts a local Prefect server (SQLite) first
    unless PREFECT_API_URL is set. Then, in another shell:
    PREFECT_API_URL=http://127.0.0.1:4200/api prefect deployment run preprocess/hdtf --watch -p raw_dir=... -p out_dir=..."""
    from synchrorama.prefect_server import DEFAULT_API_URL, is_healthy, start_server

    def stop_on_sigterm(signum, frame):  # so that `kill` also stops the children, via the finally below
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_sigterm)
    env = dict(os.environ)
    server = serving = None
    try:
        if "PREFECT_API_URL" not in env:
            if is_healthy(DEFAULT_API_URL):
                console.print(f"using the Prefect server already running at {DEFAULT_API_URL}")
            else:
                console.print(f"starting a Prefect server (log: {server_log}) ...")
                server = start_server(server_log)
            env["PREFECT_API_URL"] = DEFAULT_API_URL
        console.print(f"serving preprocess/hdtf, vfhq, mead, folder against {env['PREFECT_API_URL']} (Ctrl-C stops)")
        serving = subprocess.Popen([sys.executable, "-m", "flows.serve", "--raw-root", str(raw_root),
                                    "--out-root", str(out_root), "--profile", profile], env=env)
        serving.wait()
    except KeyboardInterrupt:
        pass
    finally:
        for child, group in ((serving, False), (server, True)):
            if child is not None and child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM) if group else child.terminate()
                try:
                    child.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    child.kill()


def _print_rows(title: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if value is None else str(value) for value in row))
    console.print(table)


@app.command("inspect")
def inspect_command(out_dir: Path = typer.Argument(..., help="a preprocess out_dir")) -> None:
    """Print counts, reject reasons, durations and per-stage time from a run's parquet tables, and disk use: bytes
    per shard member kind, per folder and per stage cache, also per kept second of video."""
    from synchrorama.inspect_tables import COLUMNS, inspect_run

    for name, rows in inspect_run(out_dir).items():
        _print_rows(name.replace("_", " "), COLUMNS[name], rows)
    console.print(f"shards: {out_dir / 'shards'}   tables: {out_dir / 'tables'}")


@app.command("report")
def report_command(
    out_dir: Path = typer.Argument(..., help="a preprocess out_dir"),
    output: Optional[Path] = typer.Option(None, help="HTML file to write (default OUT_DIR/report.html)"),
) -> None:
    """Write an HTML page with plots: yaw and duration histograms, reject reasons, time per stage."""
    from synchrorama.report import write_report

    console.print(f"report written to {write_report(out_dir, output)}")


@app.command("validate")
def validate_command(
    out_dir: Path = typer.Argument(..., help="a preprocess out_dir (or a bare shards/ dir)"),
    deep: bool = typer.Option(False, help="also re-read every input video and audio file and report those whose "
                                          "content changed since they were processed"),
) -> None:
    """Check an out_dir is one complete dataset: shards against their manifests and the schema, no interrupted
    publish, summary.json committing exactly the shards and table rows there, the clips table's shard column
    against the shards, no leftover temp files. Given a bare shard dir, checks the shards only. Exits 1 on any
    problem."""
    from shards.validate import validate_output, validate_shards

    whole_output = (out_dir / "shards").is_dir()
    problems = validate_output(out_dir) if whole_output else validate_shards(out_dir)
    if deep and whole_output:
        from preprocess.run.input_hashes import changed_inputs

        changed, checked = changed_inputs(out_dir)
        console.print(f"re-hashed {checked} input files")
        problems += changed
    for problem in problems:
        console.print(f"[red]{problem}[/red]", soft_wrap=True)
    if problems:
        console.print(f"[red]{out_dir}: {len(problems)} problem(s)[/red]")
        raise typer.Exit(1)
    what = "shards, tables and summary.json agree" if whole_output else "shards valid"
    console.print(f"[green]{out_dir}: {what}[/green]")


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                       "help_option_names": []}, add_help_option=False)
def train_command(ctx: typer.Context) -> None:
    """Train the model on shards (stage a2m, stage1 or stage2); `synchrorama train --help` lists every setting.
    Several GPUs: torchrun --nproc_per_node=N -m model.training.train with the same arguments."""
    from model.training.train import main

    main(list(ctx.args), prog="synchrorama train")


@app.command("train-experts")
def train_experts_command(
    shards: str = typer.Option(..., help="preprocessing shards: a shard dir, a tar or a WebDataset spec"),
    out: Path = typer.Option(..., help="folder for <expert>.safetensors + experts.json (stage 2's experts=)"),
    model_size: str = typer.Option("tiny", help="the model config whose experts to train: tiny or full"),
    sync_steps: int = typer.Option(2000, help="steps of the sync expert's contrastive training"),
    regressor_steps: int = typer.Option(500, help="steps of each regressor (au, valence_arousal, description)"),
    batch_size: int = typer.Option(16, help="sync spans / frames / windows per step"),
    lr: float = typer.Option(1e-3, help="AdamW learning rate"),
    shift_range: int = typer.Option(7, help="audio shifts (frames) the sync expert learns to reject and detects"),
    heldout_fraction: float = typer.Option(0.2, help="fraction of clips held out for the scores"),
    max_clips: int = typer.Option(2000, help="clips read into memory"),
    wav2vec: str = typer.Option("", help="wav2vec2 folder for clips without wav2vec.npy"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    seed: int = typer.Option(0, help="seed of the split, batches and initial weights"),
) -> None:
    """Train stage 2's loss experts (sync on mouth crops vs shifted audio; AU, VA and description regressors) on
    the shards, print their held-out scores and save them for `synchrorama train ... experts=OUT`."""
    import logging

    from model.training.train_experts import ExpertTrainingConfig, train_experts

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    report = train_experts(ExpertTrainingConfig(
        shards=shards, out=str(out), model_size=model_size, sync_steps=sync_steps, regressor_steps=regressor_steps,
        batch_size=batch_size, lr=lr, shift_range=shift_range, heldout_fraction=heldout_fraction,
        max_clips=max_clips, wav2vec=wav2vec, device=device, seed=seed))
    console.print_json(data={"trained": report.trained, "skipped": report.skipped})
    console.print(f"experts in [bold]{out}[/bold] (scores in {out / 'experts.json'})")


@app.command("generate", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                          "help_option_names": []}, add_help_option=False)
def generate_command(ctx: typer.Context) -> None:
    """Reference image + driving audio (+ description) -> talking-face mp4 with the audio, from a training
    checkpoint; `synchrorama generate --help` lists the options."""
    from model.generation.generate import GenerateError, main

    try:
        main(list(ctx.args), prog="synchrorama generate")
    except GenerateError as error:
        console.print(f"[red]generate: {error}[/red]")
        raise typer.Exit(2) from None


@app.command("build-tiny-models")
def build_tiny_models_command(
    out: Path = typer.Argument(None, help="where to build them (default: the tiny profile's .models/tiny)"),
) -> None:
    """Build the tiny models of the real classes that profile 'tiny' uses (offline, once; their numbers mean
    nothing). Preprocessing with profile 'tiny' also builds them on first use."""
    from preprocess.run.model_loading import TINY_DIR
    from tiny_models.build import build_tiny_models

    path = build_tiny_models(out or TINY_DIR)
    console.print(f"tiny models in [bold]{path}[/bold] (random weights: their outputs MEAN NOTHING)")


@app.command("summary")
def summary_command(size: str = typer.Option("tiny", help="full (SD 1.5 size) or tiny")) -> None:
    """Print the model's parameter counts per component."""
    from model.training.summary import format_summary

    console.print(format_summary(size))


@app.command("evaluate")
def evaluate_command(
    generated: Optional[Path] = typer.Option(None, help="folder of generated clips (<clip id>.mp4)"),
    ground_truth: Optional[Path] = typer.Option(None, help="folder of ground-truth clips, matched by clip id"),
    checkpoint: Optional[Path] = typer.Option(None, help="instead of the two folders: a training run or checkpoint "
                                              "folder to generate every clip of --shards with (first frame + audio)"),
    shards: Optional[Path] = typer.Option(None, help="with --checkpoint: the shard folder of the test clips"),
    limit: Optional[int] = typer.Option(None, help="with --checkpoint: only the first N clips of the shards"),
    steps: Optional[int] = typer.Option(None, help="with --checkpoint: DDIM steps (default: the recipe's)"),
    seed: int = typer.Option(0, help="with --checkpoint: the generation's noise seed"),
    weights: str = typer.Option("ema", help="with --checkpoint: ema or model weights"),
    device: str = typer.Option("auto", help="with --checkpoint: auto, cpu or cuda[:N] for the generator"),
    gen_config: list[str] = typer.Option([], "--gen-config", help="with --checkpoint: KEY=VALUE override of the "
                                         "checkpoint's training config (repeatable), as `generate --config`"),
    out: Path = typer.Option(..., help="where clips.parquet, summary.parquet, table.md, evaluation.json go"),
    profile: str = typer.Option("default", help="default (real feature networks) or tiny (random, meaningless)"),
    settings: str = typer.Option("{}", help='evaluation settings overrides as JSON, e.g. \'{"syncnet": "/m/syncnet_v2.model"}\''),
    method: Optional[str] = typer.Option(None, help="name of the method's row (default: the generated folder's "
                                         "name, or the checkpoint and its step)"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """The paper's Table 1 (PSNR, SSIM, LPIPS, FID, FVD, E-FID, AU F1, Sync, CCC_V, CCC_A) on generated vs
    ground-truth clips, per clip and aggregated: either two folders (--generated, --ground-truth), or a checkpoint
    and a shard set (--checkpoint, --shards: each clip is generated first); see docs/evaluation.md."""
    from evaluation.evaluate import TINY_WARNING, EvaluationError, evaluate_folders
    from evaluation.networks import WeightsError
    from evaluation.settings import load_evaluation_settings

    folders, from_checkpoint = (generated, ground_truth), (checkpoint, shards)
    if not (all(folders) and not any(from_checkpoint)) and not (all(from_checkpoint) and not any(folders)):
        console.print("[red]evaluate: give either --generated and --ground-truth (two folders of clips), or "
                      "--checkpoint and --shards (generate the shard clips first)[/red]", soft_wrap=True)
        raise typer.Exit(2)
    try:
        evaluation_settings = load_evaluation_settings(profile, json.loads(settings))
        if checkpoint is not None:
            from evaluation.from_checkpoint import GenerationSettings, evaluate_checkpoint

            generation = GenerationSettings(steps=steps, seed=seed, config=tuple(gen_config), weights=weights,
                                            device=device)
            result = evaluate_checkpoint(checkpoint, shards, out, evaluation_settings, generation, limit=limit,
                                         method=method, progress=progress)
        else:
            result = evaluate_folders(generated, ground_truth, out, evaluation_settings, method=method,
                                      progress=progress)
    except (EvaluationError, WeightsError, ValueError) as error:
        console.print(f"[red]evaluate: {error}[/red]", soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(result.markdown, soft_wrap=True, markup=False)
    if profile == "tiny":
        console.print(f"[red]WARNING: {TINY_WARNING}[/red]")
    console.print(f"tables in [bold]{result.out}[/bold]")


if __name__ == "__main__":
    app()

"""The `unclip` command line. Every command validates its config before touching Ray.

Importing this module stays light (typer, pydantic, yaml): torch, DeepSpeed, Ray, MLflow,
open_clip, pyarrow and boto3 load inside each command, after its config is loaded and
validated, so `--help` and bad input answer at once.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from orchestration.config import Config, ConfigError, load_config
from orchestration.jobs_cli import register as register_job_commands
from orchestration.registry_cli import generate, models_app, serve
from orchestration.stages import STAGES
from tuning.cli import tune_app

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Train and serve unCLIP text-to-image models on Ray.")
data_app = typer.Typer(no_args_is_help=True, help="Build, import and inspect datasets.")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models", help="Registered models: list versions, promote.")
app.add_typer(tune_app, name="tune")
app.command("generate")(generate)
app.command("serve")(serve)
register_job_commands(app)

ConfigOpt = Annotated[str | None, typer.Option(
    "--config", "-c", help="YAML config file or shipped name (default: tiny)")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a config key: --set clip.steps=100 (repeatable)")]


class UserError(Exception):
    """Anything the user can fix; printed as one line, exit code 2."""


def _config(config: str | None, overrides: list[str] | None) -> Config:
    return load_config(config, overrides or [])


def echo(message: str) -> None:
    typer.echo(message, err=True)


def _progress(label: str):
    start = time.monotonic()

    def report(done: int, total: int) -> None:
        elapsed = time.monotonic() - start
        eta = elapsed / done * (total - done) if done else 0.0
        echo(f"{label}: {done}/{total} ({elapsed:.1f}s elapsed, ETA {eta:.0f}s)")

    return report


@data_app.command("shapes")
def data_shapes(
    out: Annotated[str | None, typer.Option(help="Output URI (default: data.uri)")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    train_size: Annotated[int | None, typer.Option(help="Train images (Luo 2023: 20000)")] = None,
    test_size: Annotated[int | None, typer.Option(help="Test images (Luo 2023: 2000)")] = None,
    image_size: Annotated[int | None, typer.Option(help="Image side in pixels")] = None,
    position: Annotated[bool | None, typer.Option(
        "--position/--no-position", help="Mention positions in captions")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="webdataset|parquet")] = None,
    seed: Annotated[int | None, typer.Option(help="Dataset seed")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing dataset")] = False,
) -> None:
    """Render the coloured-shapes dataset of Luo 2023, sec. 3.1, into shards (in parallel, Ray)."""
    overrides = list(set_ or [])
    for key, value in (("train_size", train_size), ("test_size", test_size),
                       ("image_size", image_size), ("include_position", position),
                       ("seed", seed)):
        if value is not None:
            overrides.append(f"data.shapes.{key}={value}")
    if fmt is not None:
        overrides.append(f"data.format={fmt}")
    if out is not None:
        overrides.append(f"data.uri={out}")
    cfg = _config(config, overrides)
    from data_pipelines.shapes import build_shapes
    from orchestration.ray_runtime import connect

    connect(cfg)
    start = time.monotonic()
    manifest = build_shapes(cfg.data.uri, cfg.data.shapes, fmt=cfg.data.format,
                            overwrite=overwrite, progress=_progress("shards"))
    seconds = time.monotonic() - start
    echo(f"wrote {manifest.num_samples} samples "
         f"({', '.join(f'{k}={v.num_samples}' for k, v in manifest.splits.items())}) "
         f"to {cfg.data.uri} in {seconds:.1f}s ({manifest.num_samples / seconds:.0f} images/s)")


@data_app.command("ingest")
def data_ingest(
    src: Annotated[str, typer.Argument(help="Image folder, WebDataset shards or Parquet (local or s3://)")],
    out: Annotated[str, typer.Option(help="Output dataset URI (local or s3://)")],
    fmt: Annotated[str, typer.Option("--format", help="webdataset|parquet")] = "webdataset",
    test_fraction: Annotated[float, typer.Option(help="Share of samples put in test")] = 0.1,
    max_skip_fraction: Annotated[float, typer.Option(
        help="Fail if more than this share of images is unreadable")] = 0.01,
    samples_per_shard: Annotated[int, typer.Option(help="Samples per shard")] = 1000,
    seed: Annotated[int, typer.Option(help="Split seed")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing dataset")] = False,
) -> None:
    """Import images + captions a user has into shards, skipping and recording bad files."""
    if fmt not in ("webdataset", "parquet"):
        raise UserError(f"--format {fmt!r}: use webdataset or parquet")
    if not 0 <= test_fraction < 1:
        raise UserError(f"--test-fraction {test_fraction}: must be in [0, 1)")
    from data_pipelines.ingest import ingest

    manifest = ingest(src, out, fmt=fmt, samples_per_shard=samples_per_shard,
                      test_fraction=test_fraction, max_skip_fraction=max_skip_fraction,
                      seed=seed, overwrite=overwrite)
    echo(f"wrote {manifest.num_samples} samples, skipped {manifest.num_skipped}, to {out}")
    for item in manifest.skipped[:10]:
        echo(f"  skipped {item.source}: {item.reason}")


@data_app.command("inspect")
def data_inspect(
    uri: Annotated[str, typer.Argument(help="Dataset URI (local or s3://)")],
    sheet: Annotated[str, typer.Option(help="Contact-sheet PNG to write")] = "contact_sheet.png",
    samples: Annotated[int, typer.Option(help="Samples on the sheet")] = 16,
    seed: Annotated[int, typer.Option(help="Which random samples")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
) -> None:
    """Counts, caption statistics and skipped reasons, plus a contact sheet of samples."""
    from data_pipelines.inspect_dataset import format_report, inspect_dataset

    report = inspect_dataset(uri, contact_sheet=sheet, num_samples=samples, seed=seed)
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    echo(f"contact sheet: {Path(sheet).absolute()}")


@app.command("presets")
def presets(as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """Every model preset of every component with its parameter count."""
    from models.presets import list_presets

    rows = list_presets()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        typer.echo(f"{row['component']:8s} {row['name']:16s} {row['params'] / 1e6:8.2f}M")


@app.command("stream")
def stream(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    split: Annotated[str, typer.Option(help="Which split to stream")] = "train",
    batch_size: Annotated[int, typer.Option(help="Batch size")] = 64,
    workers: Annotated[int, typer.Option(help="Consumers (streaming_split)")] = 1,
) -> None:
    """Stream a dataset through Ray Data preprocessing and report throughput."""
    cfg = _config(config, set_)
    from orchestration.data_check import ensure_dataset, measure_stream
    from orchestration.ray_runtime import connect

    connect(cfg)
    ensure_dataset(cfg, log=echo)
    stats = measure_stream(cfg, split=split, batch_size=batch_size, num_consumers=workers)
    typer.echo(json.dumps(stats, indent=2))


@app.command("train")
def train(
    stage: Annotated[str, typer.Argument(help="clip | prior | decoder")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Train one stage as a Ray Train + DeepSpeed job (resumes a run of the same name)."""
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    cfg = _config(config, set_)
    from orchestration.training_job import run_stage

    result = run_stage(cfg, stage, log=echo)
    typer.echo(json.dumps({"stage": stage, "run_id": result.run_id,
                           "weights": result.portable_uri,
                           "metrics": _scalars(result.final_metrics)}, indent=2))


@app.command("embed")
def embed(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Write CLIP embedding shards (Parquet) for every split, with a manifest."""
    cfg = _config(config, set_)
    from orchestration.embed_job import run_embed

    manifest = run_embed(cfg, log=echo)
    typer.echo(json.dumps(manifest, indent=2))


@app.command("pipeline")
def pipeline(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    only: Annotated[list[str] | None, typer.Option(
        help="Run only these stages (repeatable): data clip embed prior decoder eval register")
    ] = None,
    from_stage: Annotated[str | None, typer.Option(help="Start at this stage")] = None,
) -> None:
    """The whole DAG end to end; reruns skip complete stages and resume the interrupted one."""
    cfg = _config(config, set_)
    from orchestration.pipeline import run_pipeline

    try:
        summary = run_pipeline(cfg, only=only, from_stage=from_stage, log=echo)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    typer.echo(json.dumps(summary, indent=2))
    if "grid" in summary:
        echo(f"\ngenerated image grid: {summary['grid']}")
    echo(f"pipeline took {summary['seconds']:.0f}s. Browse runs and models with:\n"
         f"  mlflow ui --backend-store-uri {cfg.mlflow.tracking_uri}   # then open "
         "http://127.0.0.1:5000")


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


# Errors a user can fix, by (module, class). Their modules are heavy (pyarrow, MLflow), so main
# never imports them: an error of a module that was never imported cannot have been raised.
USER_ERRORS = (
    ("data_pipelines.storage", "StorageError"),
    ("data_pipelines.ingest", "IngestError"),
    ("orchestration.registry", "RegistryError"),
    ("orchestration.submission", "SubmissionError"),
)


def _user_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [UserError, ConfigError]
    for module_name, class_name in USER_ERRORS:
        error = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(error, type) and issubclass(error, BaseException):
            types.append(error)
    return tuple(types)


def main() -> None:
    try:
        app()
    except Exception as exc:
        if not isinstance(exc, _user_error_types()):
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

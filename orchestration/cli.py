"""The `unclip` command line. Every command validates its config before touching Ray.

Importing this module stays light (typer, pydantic, yaml): torch, DeepSpeed, Ray, MLflow,
open_clip, pyarrow and boto3 load inside each command, after its config is loaded and
validated, so `--help` and bad input answer at once.
"""

from __future__ import annotations

import importlib.metadata
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

import typer

from orchestration.config import Config, ConfigError, load_config
from orchestration.jobs.cli import register as register_job_commands
from orchestration.serve.models_cli import (
    InsecureOpt,
    TokenFileOpt,
    generate,
    models_app,
    serve,
)
from orchestration.stages import STAGES

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Train and serve unCLIP text-to-image models on Ray.")
data_app = typer.Typer(no_args_is_help=True, help="Build, import and inspect datasets.")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models", help="Registered models: list versions, promote.")
app.command("generate")(generate)
app.command("serve")(serve)
register_job_commands(app)


def _mount_command_groups(app: typer.Typer) -> None:
    """Command groups of the packages layered above orchestration (tuning's `unclip tune`)
    are listed in one place, the `unclip.commands` entry points of pyproject.toml, and
    mounted here, so orchestration never imports the layers built on top of it."""
    for entry in sorted(importlib.metadata.entry_points(group="unclip.commands"),
                        key=lambda e: e.name):
        app.add_typer(entry.load(), name=entry.name)


_mount_command_groups(app)

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
    from data_pipelines.progress import progress_bar
    from data_pipelines.shapes import build_shapes
    from orchestration.common.ray_runtime import connect

    connect(cfg)
    start = time.monotonic()
    with progress_bar("shapes", unit="shard") as bar:
        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        manifest = build_shapes(cfg.data.uri, cfg.data.shapes, fmt=cfg.data.format,
                                overwrite=overwrite, progress=advance)
    seconds = time.monotonic() - start
    echo(f"wrote {manifest.num_samples} samples "
         f"({', '.join(f'{k}={v.num_samples}' for k, v in manifest.splits.items())}) "
         f"to {cfg.data.uri} in {seconds:.1f}s ({manifest.num_samples / seconds:.0f} images/s)")


@data_app.command("ingest")
def data_ingest(
    src: Annotated[str, typer.Argument(
        help="Image folder, WebDataset shards (img2dataset output too) or Parquet (local or s3://)")],
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
    from data_pipelines.progress import progress_bar

    with progress_bar("ingest") as bar:
        def advance(kept: int, skipped: int) -> None:
            bar.update(kept + skipped - bar.n)
            bar.set_postfix(kept=kept, skipped=skipped, refresh=False)

        manifest = ingest(src, out, fmt=fmt, samples_per_shard=samples_per_shard,
                          test_fraction=test_fraction, max_skip_fraction=max_skip_fraction,
                          seed=seed, overwrite=overwrite, progress=advance)
    echo(f"wrote {manifest.num_samples} samples, skipped {manifest.num_skipped}, to {out}")
    _echo_skipped(manifest)


@data_app.command("index")
def data_index(
    src: Annotated[str, typer.Argument(
        help="Folder of WebDataset .tar shards, e.g. img2dataset output (local or s3://)")],
    out: Annotated[str | None, typer.Option(
        help="Folder for the manifest (default: data/indexed/<SRC name>); use it as data.uri")
    ] = None,
    test_fraction: Annotated[float | None, typer.Option(
        help="Share of whole shards put in test (default 0.1)")] = None,
    test_shards: Annotated[int | None, typer.Option(
        help="Number of whole shards put in test (instead of --test-fraction)")] = None,
    seed: Annotated[int, typer.Option(help="Split seed")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing manifest at --out")] = False,
) -> None:
    """Index existing WebDataset shards in place: writes only a manifest, copies nothing."""
    if test_fraction is not None and test_shards is not None:
        raise UserError("--test-fraction and --test-shards: give one of them, not both")
    from data_pipelines.index import index_shards
    from data_pipelines.progress import progress_bar

    with progress_bar("index", unit="shard") as bar:
        def advance(done: int, total: int, samples: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
            bar.set_postfix(samples=samples, refresh=False)

        manifest, uri = index_shards(
            src, out, test_fraction=0.1 if test_fraction is None else test_fraction,
            test_shards=test_shards, seed=seed, overwrite=overwrite, progress=advance)
    splits = ", ".join(f"{name} {info.num_samples} in {len(info.shards)} shard(s)"
                       for name, info in manifest.splits.items())
    echo(f"indexed {manifest.num_samples} samples ({splits}) at {uri}/manifest.json; "
         f"train on them with --set data.uri={uri}")
    _echo_skipped(manifest)


def _echo_skipped(manifest) -> None:
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
    from orchestration.common.data_check import ensure_dataset, measure_stream
    from orchestration.common.ray_runtime import connect

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
    from orchestration.train.training_job import run_stage

    result = run_stage(cfg, stage, log=echo)
    typer.echo(json.dumps({"stage": stage, "run_id": result.run_id,
                           "weights": result.portable_uri,
                           "metrics": _scalars(result.final_metrics)}, indent=2))


@app.command("embed")
def embed(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Write CLIP embedding shards (Parquet) for every split, with a manifest."""
    cfg = _config(config, set_)
    from orchestration.train.embed_job import run_embed

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
    from orchestration.pipeline import format_summary, outputs_dir, run_pipeline

    try:
        summary = run_pipeline(cfg, only=only, from_stage=from_stage, log=echo)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    typer.echo(format_summary(summary, cfg.mlflow.tracking_uri))
    echo(f"\nsummary (JSON): {outputs_dir(cfg) / 'pipeline_summary.json'}")
    if "grid" in summary:
        echo(f"generated image grid: {summary['grid']}")
    echo(f"pipeline took {summary['seconds']:.0f}s. Browse runs and models with:\n"
         f"  mlflow ui --backend-store-uri {cfg.mlflow.tracking_uri}   # then open "
         "http://127.0.0.1:5000")


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Option(
        help="models:/NAME@alias, models:/NAME/VERSION, runs:/ID/path or a pipeline folder "
             "(e.g. release/shapes)")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[str | None, typer.Option(
        help="Folder for metrics.json, evaluation.json and grids (default: "
             "outputs/eval-<model>)")] = None,
    sampler: Annotated[str | None, typer.Option(
        help="ddim | ddpm instead of the model's default sampler")] = None,
    steps: Annotated[int | None, typer.Option(
        help="Decoder sampling steps instead of the model's (0: every training step)")] = None,
    conditioning: Annotated[str, typer.Option(
        help="prior (the full pipeline) | image (decoder-only reconstruction from the true "
             "image's CLIP embedding) | text (no prior: the text embedding goes to the "
             "decoder); the ablation of Zbinden 2022, sec. 5.1")] = "prior",
) -> None:
    """Score any model on the config's held-out split with its reference evaluator, exactly
    as the pipeline's eval stage does; prints each metric with its 95% interval. A release
    folder (`unclip release`) without -c is scored with its own evaluator and dataset recipe,
    beside the numbers it was released with."""
    from orchestration.release import is_release, release_config

    release = config is None and is_release(model)
    cfg = release_config(model, set_) if release else _config(config, set_)
    if sampler not in (None, "ddim", "ddpm"):
        raise ConfigError(f"--sampler {sampler!r}: use ddim or ddpm")
    if conditioning not in ("prior", "image", "text"):
        raise ConfigError(f"--conditioning {conditioning!r}: use prior, image or text")
    from orchestration.evaluate.evaluation import evaluate_model, format_report

    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in model).strip("-")
    suffix = "" if conditioning == "prior" else f"-{conditioning}"
    out_dir = Path(out) if out else Path("outputs") / f"eval-{slug}{suffix}"
    sampling = {k: v for k, v in {"sampler": sampler}.items() if v is not None}
    if steps is not None:
        sampling["steps"] = steps or None
    from orchestration.common.threads import set_torch_threads

    set_torch_threads()  # after the checks above: bad input answers before torch loads
    report = evaluate_model(model, cfg, out_dir, log=echo, sampling=sampling,
                            conditioning=conditioning)
    typer.echo(format_report(report))
    if release:
        from orchestration.release import compare_with_release

        typer.echo(compare_with_release(model, cfg, report))
    echo(f"metrics: {out_dir / 'metrics.json'}; per-caption scores: "
         f"{out_dir / 'evaluation.json'}; grids: {out_dir}")


@app.command("compare")
def compare(
    candidate: Annotated[str, typer.Argument(
        help="An evaluation: the folder `unclip eval`, the pipeline (outputs/<run_name>) or "
             "`unclip release` wrote, or its evaluation.json")],
    baseline: Annotated[str, typer.Argument(help="The evaluation to compare it with")],
    reps: Annotated[int, typer.Option(min=100, help="Bootstrap resamples")] = 5000,
) -> None:
    """Is one model better than another? Paired comparison of two evaluations of the same
    captions, seeds and evaluator: per metric, the mean per-caption difference and its 95%
    bootstrap interval (the promotion gate's test), without evaluating anything again."""
    from orchestration.evaluate.evaluation import format_comparison, paired_comparison, read_report

    first, second = read_report(candidate), read_report(baseline)
    rows = paired_comparison(first, second, reps=reps)
    typer.echo(format_comparison(rows, first.evaluator))


@app.command("release")
def release(
    model: Annotated[str, typer.Option(
        help="models:/NAME@alias, models:/NAME/VERSION, runs:/ID/path, a pipeline folder, or "
             "a release (rescored, e.g. with a new evaluator; its lineage is kept)")],
    out: Annotated[str, typer.Option(help="Release folder to write (e.g. release/shapes)")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_uri: Annotated[str | None, typer.Option(
        help="Dataset path written into the release's eval.yaml, where `unclip eval` builds "
             "or finds it (default: data.uri as the config file gives it)")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing release folder")] = False,
) -> None:
    """Write a model as a small self-contained folder: fp16 weights, its reference evaluator,
    the config that re-checks it and release.json (metrics from evaluating the release
    itself, lineage). Users run it without training: `unclip generate --model OUT`."""
    cfg = _config(config, set_)
    recipe_uri = data_uri or load_config(config, set_ or [], absolute_paths=False,
                                         check_models=False).data.uri
    from orchestration.common.threads import set_torch_threads
    from orchestration.release import write_release

    set_torch_threads()
    written = write_release(model, cfg, Path(out), data_uri=recipe_uri, overwrite=overwrite,
                            log=echo)
    typer.echo(json.dumps({"out": out, "metrics": written["eval"]["metrics"]}, indent=2))


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


@app.command("app")
def web_app(
    model: Annotated[list[str] | None, typer.Option(
        "--model", "-m", help="models:/NAME@alias, models:/NAME/VERSION or a dir (repeatable; "
        "the first two fill the pickers, the first answers the JSON API; default: the "
        "config's registered model @champion and @candidate)")] = None,
    host: Annotated[str, typer.Option(help="Bind address (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    gpus: Annotated[float, typer.Option(min=0, help="GPUs for the app's replica")] = 0.0,
    config: ConfigOpt = None,
    tracking_uri: Annotated[str | None, typer.Option(
        "--tracking-uri", help="MLflow tracking URI (overrides the config's)")] = None,
    token_file: TokenFileOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """A web page (Gradio) to try models side by side, beside the JSON API, until Ctrl-C."""
    from orchestration.serve.access import TOKEN_USER_HINT, access_for

    access = access_for(host, token_file, insecure)  # before Ray: a wide bind needs a token
    cfg = _config(config, None)
    uri = tracking_uri or cfg.mlflow.tracking_uri
    from orchestration.common.ray_runtime import connect
    from orchestration.serve.web_app import app_models, run_web_app

    models = app_models(model, tracking_uri=uri, registered_model=cfg.mlflow.registered_model)
    connect(cfg)  # the config's Ray address, $RAY_ADDRESS or a local instance

    def ready(url: str) -> None:
        login = f"; the page's login takes {TOKEN_USER_HINT}" if access.token_digest else ""
        echo(f"page at {access.startup_line(url + '/')} with {', '.join(models)} (JSON API: "
             f"POST / and /generate, GET /health){login}; Ctrl-C stops")

    run_web_app(models, tracking_uri=uri, host=host, port=port, num_gpus=gpus, access=access,
                on_ready=ready)


# Errors a user can fix, by (module, class). Their modules are heavy (pyarrow, MLflow), so main
# never imports them: an error of a module that was never imported cannot have been raised.
USER_ERRORS = (
    ("data_pipelines.storage", "StorageError"),
    ("data_pipelines.ingest", "IngestError"),
    ("data_pipelines.index", "IndexingError"),
    ("orchestration.registry.registry", "RegistryError"),
    ("orchestration.jobs.submission", "SubmissionError"),
    ("orchestration.train.training_job", "StageError"),
    ("orchestration.serve.access", "AccessError"),
)


def _user_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [UserError, ConfigError]
    for module_name, class_name in USER_ERRORS:
        error = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(error, type) and issubclass(error, BaseException):
            types.append(error)
    return tuple(types)


def _exit_on_sigterm(signum, frame) -> None:
    # `unclip jobs stop` and process managers send SIGTERM: unwind like Ctrl-C, so the
    # MLflow runs of the interrupted work end KILLED instead of staying RUNNING
    raise SystemExit(128 + signum)


def main() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        app()
    except Exception as exc:
        if not isinstance(exc, _user_error_types()):
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

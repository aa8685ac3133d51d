"""CLI pieces for the registry, generation and serving, mounted into `unclip` by cli.py.

Errors a user can fix are raised as `RegistryError` (printed as one line by the CLI).
MLflow, torch and Ray load inside the commands, after their options and config are checked,
so importing this module (and `unclip --help`) stays light.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer

models_app = typer.Typer(no_args_is_help=True,
                         help="Registered models: list versions, promote one to champion.")

TokenFileOpt = Annotated[str | None, typer.Option(
    "--token-file", help="File holding the access token every request must carry "
    "(Authorization: Bearer); required to bind beyond loopback unless --insecure")]
InsecureOpt = Annotated[bool, typer.Option(
    "--insecure", help="Bind beyond loopback without an access token (anyone who can reach "
    "the port can generate)")]
ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", help="models:/NAME@alias, models:/NAME/VERSION, runs:/ID/path or a dir")]
ConfigOpt = Annotated[str | None, typer.Option(
    "--config", "-c", help="Config whose mlflow.tracking_uri to use (default: tiny)")]
TrackingOpt = Annotated[str | None, typer.Option(
    "--tracking-uri", help="MLflow tracking URI (overrides the config's)")]


def _mlflow_config(config: str | None):
    from orchestration.config import load_config

    return load_config(config).mlflow


def _tracking_uri(config: str | None, tracking_uri: str | None) -> str:
    return tracking_uri or _mlflow_config(config).tracking_uri


@models_app.command("list")
def list_models(
    name: Annotated[str | None, typer.Argument(
        help="Registered model name (default: the config's mlflow.registered_model)")] = None,
    config: ConfigOpt = None,
    tracking_uri: TrackingOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Versions with their aliases and key metrics, oldest first."""
    settings = _mlflow_config(config)
    name = name or settings.registered_model
    from orchestration.registry.registry import list_versions

    rows = list_versions(name, tracking_uri=tracking_uri or settings.tracking_uri)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(format_versions(name, rows))


def format_versions(name: str, rows: list[dict]) -> str:
    lines = [f"{name}: {len(rows)} version(s)",
             f"{'version':>7}  {'aliases':<20}  {'created':<25}  metrics"]
    for row in rows:
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(row["metrics"].items()))
        lines.append(f"{row['version']:>7}  {','.join(row['aliases']) or '-':<20}  "
                     f"{row['created']:<25}  {metrics or '-'}")
    return "\n".join(lines)


@models_app.command("promote")
def promote_model(
    name: Annotated[str, typer.Argument(help="Registered model name")],
    version: Annotated[int, typer.Argument(help="Version to make champion")],
    config: ConfigOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Explicitly move the `champion` alias to VERSION (bypasses the metric gate)."""
    uri = _tracking_uri(config, tracking_uri)
    from orchestration.registry.registry import promote

    promote(name, version, tracking_uri=uri)
    typer.echo(f"{name} v{version} is now champion (models:/{name}@champion)")


CLI_FLAGS = {"num_images": "--n", "decoder_guidance": "--guidance"}  # option -> its flag


def generate(
    model: ModelOpt,
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Text (repeatable)")],
    n: Annotated[int, typer.Option("--n", help="Images per prompt")] = 4,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same images)")] = 0,
    guidance: Annotated[float | None, typer.Option(
        help="Decoder guidance scale (default: the model's)")] = None,
    prior_guidance: Annotated[float | None, typer.Option(
        help="Prior guidance scale (default: the model's)")] = None,
    sampler: Annotated[str | None, typer.Option(help="ddpm | ddim")] = None,
    steps: Annotated[int | None, typer.Option(help="Decoder sampling steps")] = None,
    out: Annotated[str, typer.Option(help="Grid PNG to write (one row per prompt)")] = "grid.png",
    config: ConfigOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Generate images from a registered model, run or local directory into a PNG grid."""
    from orchestration.registry.pyfunc_model import (
        InvalidRequest,
        check_model_limits,
        check_options,
        check_prompt,
    )
    from orchestration.registry.pyfunc_model import generate_kwargs as to_kwargs

    try:
        prompts = [check_prompt(p) for p in prompt]
        options = check_options({"num_images": n, "seed": seed, "decoder_guidance": guidance,
                                 "prior_guidance": prior_guidance, "sampler": sampler,
                                 "steps": steps})
    except InvalidRequest as exc:
        raise _flag_error(exc) from None
    uri = _uri_if_needed(model, config, tracking_uri)
    from models.unclip_pipeline import UnCLIPPipeline, images_to_grid
    from orchestration.common.threads import set_torch_threads
    from orchestration.registry.registry import resolve_model_uri

    set_torch_threads()  # torch's default pools oversubscribe a shared machine (threads.py)
    with tempfile.TemporaryDirectory(prefix="unclip-generate-") as download:
        directory = resolve_model_uri(model, dst_dir=download, tracking_uri=uri)
        pipeline = UnCLIPPipeline.load(directory)  # weights are in memory: the copy can go
    try:
        check_model_limits(pipeline, options)
    except InvalidRequest as exc:
        raise _flag_error(exc) from None
    images = pipeline.generate(prompts, **to_kwargs(options))
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    images_to_grid(images, nrow=options["num_images"]).save(target)
    typer.echo(f"wrote {len(images)} images ({len(prompts)} prompt(s) x {n}) to "
               f"{target.absolute()}")


def _flag_error(exc) -> Exception:
    """An option's InvalidRequest, named by the command-line flag the user typed."""
    from orchestration.registry.registry import RegistryError

    flag = CLI_FLAGS.get(exc.field, f"--{exc.field.replace('_', '-')}")
    return RegistryError(f"{flag}: {exc.reason}")


def _uri_if_needed(model: str, config: str | None, tracking_uri: str | None) -> str | None:
    # A local directory needs no tracking server (nor a valid config).
    if "://" not in model and not model.startswith(("models:", "runs:")):
        return tracking_uri
    return _tracking_uri(config, tracking_uri)


def serve(
    model: ModelOpt,
    host: Annotated[str, typer.Option(help="Bind address (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    replicas: Annotated[int, typer.Option(min=1, help="Replicas (each loads the model)")] = 1,
    gpus: Annotated[float, typer.Option(min=0, help="GPUs per replica")] = 0.0,
    config: ConfigOpt = None,
    tracking_uri: TrackingOpt = None,
    token_file: TokenFileOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Serve a model over HTTP with Ray Serve until Ctrl-C."""
    from orchestration.config import load_config
    from orchestration.serve.access import access_for

    access = access_for(host, token_file, insecure)  # before Ray: a wide bind needs a token
    uri = _uri_if_needed(model, config, tracking_uri)
    cfg = load_config(config)
    from orchestration.common.ray_runtime import connect
    from orchestration.serve.serving import run_server

    connect(cfg)  # the config's Ray address, $RAY_ADDRESS or a local instance

    def ready(url: str) -> None:
        typer.echo(f"serving {model} at {access.startup_line(url + '/')} (GET /health; POST "
                   f"JSON {{\"prompt\": \"a red circle\", \"num_images\": 2}}); Ctrl-C stops",
                   err=True)

    run_server(model, tracking_uri=uri, host=host, port=port, num_replicas=replicas,
               num_gpus=gpus, access=access, on_ready=ready)

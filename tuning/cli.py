"""`unclip tune lr|guidance`: the two sweeps as commands (mounted as `unclip tune` through the
`unclip.commands` entry point in pyproject.toml).

Errors a user can fix are ConfigError subclasses, which `unclip`'s main prints as one line.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from orchestration.config import ConfigError, load_config

tune_app = typer.Typer(no_args_is_help=True,
                       help="Ray Tune sweeps: learning rate / warm-up, guidance scale.")

ConfigOpt = Annotated[str | None, typer.Option(
    "--config", "-c", help="YAML config file or shipped name (default: tiny)")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a config key: --set clip.steps=100 (repeatable)")]


def _echo(message: str) -> None:
    typer.echo(message, err=True)


@tune_app.command("lr")
def lr(
    stage: Annotated[str, typer.Option(help="clip | prior | decoder")] = "clip",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    samples: Annotated[int, typer.Option(help="Trials (times each grid() is repeated)")] = 8,
    space: Annotated[list[str] | None, typer.Option(
        help="Extra search space KEY=SPEC (repeatable): choice(a,b), grid(a,b), uniform(lo,hi),"
             " loguniform(lo,hi), randint(lo,hi); e.g. clip.batch_size=choice(32,64)")] = None,
    max_concurrent: Annotated[int | None, typer.Option(
        help="Trials at once (default and cap: what the cluster's CPUs/GPUs hold)")] = None,
    resume: Annotated[bool, typer.Option(help="Continue a crashed sweep of this run name")
                      ] = False,
    diverge_factor: Annotated[float, typer.Option(
        help="A trial diverged when its loss exceeds this times its first logged loss")] = 10.0,
) -> None:
    """Learning rate (log-uniform) and warm-up sweep with ASHA early stopping on val_loss."""
    if samples < 1:
        raise ConfigError(f"--samples {samples}: must be at least 1")
    cfg = load_config(config, set_ or [])
    from tuning.search_space import parse_space

    extra_space = parse_space(space)  # bad specs fail here, before Ray or DeepSpeed load
    from tuning.lr_sweep import run_lr_sweep
    from tuning.report import trial_table_markdown

    result = run_lr_sweep(cfg, stage=stage, num_samples=samples, max_concurrent=max_concurrent,
                          resume=resume, extra_space=extra_space,
                          diverge_factor=diverge_factor, log=_echo)
    _echo(trial_table_markdown(result.rows))
    typer.echo(json.dumps({
        "sweep_id": result.sweep_id, "mlflow_parent_run": result.parent_run_id,
        "experiment": result.experiment_uri, "counts": result.counts,
        "best": {k: v for k, v in (result.best or {}).items() if not k.startswith("_")} or None,
        "best_params": (result.best or {}).get("_params"),
        "best_config": str(result.best_config_path) if result.best_config_path else None,
    }, indent=2, default=str))


@tune_app.command("guidance")
def guidance(
    model: Annotated[str, typer.Option(
        help="models:/NAME@alias, models:/NAME/VERSION, runs:/ID/path or a pipeline folder")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    decoder_scales: Annotated[str, typer.Option(help="Comma-separated decoder scales")
                              ] = "1,1.5,2,2.5,3",
    prior_scales: Annotated[str | None, typer.Option(
        help="Comma-separated prior scales (default: the model's own)")] = None,
    samples: Annotated[int | None, typer.Option(
        help="Held-out captions per scale (default: eval.num_captions)")] = None,
    sampler: Annotated[str | None, typer.Option(help="ddim | ddpm (default: the model's)")
                       ] = None,
    steps: Annotated[int | None, typer.Option(help="Decoder sampling steps")] = None,
    objective: Annotated[str, typer.Option(
        help="fd_clip:min, f1:max, r_precision:max, precision@recall>=0.5, ...")
    ] = "fd_clip:min",
    search: Annotated[str, typer.Option(
        help="grid: every pair of the scales; optuna: TPE over their [min, max] range "
             "(needs the optuna extra)")] = "grid",
    trials: Annotated[int, typer.Option(help="Trials for --search optuna")] = 8,
) -> None:
    """Guidance-scale sweep on held-out captions, scored by the dataset's reference evaluator;
    tags the model version with the best."""
    from tuning.guidance_space import parse_scales, search_space
    from tuning.objective import parse_objective

    goal = parse_objective(objective)  # fail before loading anything
    scales = parse_scales(decoder_scales, option="--decoder-scales")
    search_space(search, scales, None, goal, trials)
    if sampler not in (None, "ddim", "ddpm"):
        raise ConfigError(f"--sampler {sampler!r}: use ddim or ddpm")
    cfg = load_config(config, set_ or [])
    from tuning.guidance_sweep import run_guidance_sweep
    from tuning.report import trial_table_markdown

    result = run_guidance_sweep(
        model, config=cfg, decoder_scales=scales,
        prior_scales=parse_scales(prior_scales, option="--prior-scales") or None,
        num_samples=samples, sampler=sampler, steps=steps, objective=objective, search=search,
        num_trials=trials, log=_echo)
    _echo(trial_table_markdown(result["results"]))
    typer.echo(json.dumps({k: result[k] for k in ("sweep_id", "run_id", "objective",
                                                  "objective_satisfied", "best",
                                                  "model_version")}, indent=2))

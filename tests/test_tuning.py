"""Sweeps: parsers (fast), then a real Ray Tune + Train + DeepSpeed + MLflow LR sweep and a
guidance sweep on a tiny registered pipeline (slow)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from ray import tune
from test_evaluation import save_random_evaluator

from orchestration.config import ConfigError, load_config
from tuning.lr_sweep import SweepReportCallback, best_row
from tuning.objective import Objective, ObjectiveError, parse_objective
from tuning.report import trial_table_markdown
from tuning.search_space import SearchSpaceError, check_space, parse_space, parse_value

# --- fast ----------------------------------------------------------------------------------


def test_search_space_kinds_and_values():
    space = parse_space(["clip.batch_size=choice(32, 64)", "clip.optim.lr=loguniform(1e-5,1e-3)",
                         "clip.optim.warmup_fraction=uniform(0,0.2)", "clip.steps=randint(10,20)",
                         "deepspeed.zero_stage=grid(0,2)"])
    assert space["clip.batch_size"].categories == [32, 64]
    assert (space["clip.optim.lr"].lower, space["clip.optim.lr"].upper) == (1e-5, 1e-3)
    assert isinstance(space["clip.optim.lr"].sampler, type(tune.loguniform(1, 2).sampler))
    assert space["deepspeed.zero_stage"] == {"grid_search": [0, 2]}
    assert parse_value("1e-5") == 1e-5 and parse_value("true") is True
    check_space(load_config("tiny"), space)


@pytest.mark.parametrize(("item", "message"), [
    ("clip.lr", "expected KEY=SPEC"),
    ("clip.optim.lr=1e-3", "expected one of"),
    ("clip.optim.lr=normal(0,1)", "unknown kind 'normal'"),
    ("clip.optim.lr=loguniform(0,1e-3)", "positive low bound"),
    ("clip.optim.lr=uniform(3,1)", "low must be below high"),
    ("clip.optim.lr=uniform(1)", "two numbers"),
    ("clip.steps=randint(1.5,4)", "two integers"),
    ("clip.batch_size=choice()", "at least one value"),
])
def test_search_space_errors_are_one_line(item, message):
    with pytest.raises(SearchSpaceError, match=message) as err:
        parse_space([item])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("item", "message"), [
    ("clip.optim.lrr=choice(1e-3)", "no such config key"),
    ("clip.batch_size=choice(32,0)", "clip.batch_size"),
    ("deepspeed.offload_params=choice(true)", "zero_stage 3"),
])
def test_search_space_checked_against_the_config(item, message):
    with pytest.raises(SearchSpaceError, match=message):
        check_space(load_config("tiny"), parse_space([item]))


def test_preset_overrides_are_free_form_keys():
    check_space(load_config("tiny"), parse_space(["decoder.overrides.num_timesteps=choice(20)"]))


def test_objective_parsing():
    assert parse_objective("fd_clip") == Objective("fd_clip", "min")
    assert parse_objective("f1") == Objective("f1", "max")
    assert parse_objective("kid_clip:max").mode == "max"
    assert parse_objective("precision@recall>=0.5") == Objective(
        "precision", "max", ("recall", ">=", 0.5))
    assert str(parse_objective(" fd_clip : min @ clip_score >= 0.2 ")) == \
        "fd_clip:min@clip_score>=0.2"
    for bad in ("", "fid", "precision@recall>0.5", "f1:best", "precision@recal>=0.5"):
        with pytest.raises(ObjectiveError):
            parse_objective(bad)


def test_objective_picks_best_and_falls_back_when_unsatisfied():
    rows = [{"fd_clip": 3.0, "precision": 0.9, "recall": 0.1},
            {"fd_clip": 1.0, "precision": 0.6, "recall": 0.5},
            {"fd_clip": 2.0, "precision": 0.7, "recall": 0.6},
            {"fd_clip": 0.5, "precision": math.nan, "recall": 1.0}]
    assert parse_objective("fd_clip:min").pick(rows) == (3, True)
    assert parse_objective("precision@recall>=0.4").pick(rows) == (2, True)
    assert parse_objective("precision").pick(rows) == (0, True)  # NaN rows never win
    assert parse_objective("precision@recall>=0.95").pick(rows) == (2, False)
    assert parse_objective("fd_clip@recall>=2").pick(rows[:3]) == (2, False)


def test_divergence_rule():
    callback = SweepReportCallback.__new__(SweepReportCallback)  # no Tune session needed
    callback.factor, callback.first_loss = 10.0, None
    assert callback._divergence({"loss": 2.0}) is None
    assert callback._divergence({"loss": 15.0, "val_loss": 3.0}) is None
    assert "10 x first loss" in callback._divergence({"loss": 25.0})
    assert "nan" in callback._divergence({"loss": float("nan")})
    assert "val_loss is inf" in callback._divergence({"loss": 1.0, "val_loss": math.inf})


def test_trial_status_divergence_outranks_an_error_raised_while_stopping():
    from types import SimpleNamespace

    from tuning.lr_sweep import _reason, _status

    stopped = SimpleNamespace(error=RuntimeError("worker group shut down\ntraceback..."))
    clean = SimpleNamespace(error=None)
    flagged = {"diverged": 1, "diverged_reason": "loss is nan", "step": 4}
    assert _status(stopped, flagged, 8) == "diverged"
    assert _reason(stopped, flagged) == "loss is nan (then, while stopping: worker group shut down)"
    assert _status(stopped, {"diverged": 0, "step": 4}, 8) == "error"
    assert _reason(stopped, {"step": 4}) == "worker group shut down"
    assert [_status(clean, {"diverged": 0, "step": step}, 8) for step in (4, 8)] == [
        "stopped_early", "completed"]


def test_best_row_prefers_completed_trials():
    rows = [{"trial_id": "a", "val_loss": 0.5, "status": "stopped_early"},
            {"trial_id": "b", "val_loss": 0.9, "status": "completed"},
            {"trial_id": "c", "val_loss": math.inf, "status": "diverged"},
            {"trial_id": "d", "val_loss": 0.7, "status": "completed", "_params": {}}]
    assert best_row(rows)["trial_id"] == "d"
    assert best_row(rows[:1])["trial_id"] == "a"
    assert best_row(rows[2:3]) is None
    table = trial_table_markdown(rows[:2])
    assert table.splitlines()[0] == "| trial_id | val_loss | status |" and "0.9" in table


# --- slow: real Ray Tune / Train / DeepSpeed / MLflow ----------------------------------------


def sweep_overrides(tmp_path) -> list[str]:
    """CLIP, 8 steps, evaluated at steps 4 and 8: two ASHA rungs, a minute or so per trial."""
    return [f"data.uri={tmp_path}/shapes", f"storage_root={tmp_path}/runs", "run_name=sweep",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            "data.shapes.train_size=160", "data.shapes.test_size=32",
            "data.shapes.samples_per_shard=80", "scaling.num_workers=1",
            "scaling.cpus_per_worker=1", "scaling.torch_threads=1", "clip.steps=8",
            "clip.batch_size=8", "clip.log_every=2", "clip.checkpoint_every=4",
            "clip.keep_checkpoints=1", "clip.optim.ema_decay=0.5"]


@pytest.fixture
def stale_current_cluster():
    """/tmp/ray's "current cluster" names a cluster that is gone (as after `ray start` and
    `ray stop`, or a killed session): nothing of this run may depend on it."""
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = path.read_text() if path.exists() else None
    path.write_text("127.0.0.1:9")  # the discard port: no GCS answers there
    yield
    if saved is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(saved)


def cpu_groups_left(timeout: float = 60.0) -> list[dict]:
    """Placement groups still holding CPUs, once Train's cleaners have had time to act."""
    import time

    from ray.util import placement_group_table

    deadline = time.monotonic() + timeout
    while True:
        left = [pg["bundles"] for pg in placement_group_table().values()
                if pg["state"] != "REMOVED" and any("CPU" in b for b in pg["bundles"].values())]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(1.0)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session", "stale_current_cluster")
def test_lr_sweep_early_stops_records_divergence_and_writes_best_config(tmp_path, monkeypatch):
    from tuning.lr_sweep import SweepError, run_lr_sweep

    monkeypatch.chdir(tmp_path)  # outputs/<run_name>/best-clip.yaml lands here
    config = load_config("tiny", sweep_overrides(tmp_path))
    # a fixed grid, in order: the good rate sets ASHA's bar, the tiny one falls below it at
    # the first rung, lr=1e30 turns the weights (and so the loss) into NaN after one step.
    # (lr=10 is not enough: Adam's steps are bounded by lr and CLIP's loss by its clamped
    # temperature, so it only collapses to chance level.)
    space = parse_space(["clip.optim.lr=grid(2e-3,1e-7,1e30)",
                         "clip.optim.warmup_fraction=choice(0.0)"])
    result = run_lr_sweep(config, stage="clip", num_samples=1, max_concurrent=1,
                          extra_space=space)
    by_lr = {row["lr"]: row for row in result.rows}
    print(trial_table_markdown(result.rows))  # shown when an assertion below fails
    assert by_lr[2e-3]["status"] == "completed" and by_lr[2e-3]["step"] == 8
    assert by_lr[1e-7]["status"] == "stopped_early" and by_lr[1e-7]["step"] == 4
    assert by_lr[1e30]["status"] == "diverged" and "nan" in by_lr[1e30]["reason"]
    assert result.counts == {"completed": 1, "stopped_early": 1, "diverged": 1, "error": 0}
    assert result.best["lr"] == 2e-3
    # the trials stopped early hold nothing afterwards: their Train placement groups (CPUs
    # the next trial's data tasks need) are removed once their controllers are gone
    assert cpu_groups_left() == []

    client = MlflowClient(config.mlflow.tracking_uri)
    children = client.search_runs(
        [client.get_run(result.parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(children) == 3
    assert {run.data.tags["unclip.sweep_id"] for run in children} == {result.sweep_id}
    statuses = {run.data.tags["unclip.trial_status"]: run.info.status for run in children}
    assert statuses == {"completed": "FINISHED", "stopped_early": "KILLED",
                        "diverged": "KILLED"}
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "sweep")}
    assert {"sweep/trials.csv", "sweep/trials.md", "sweep/best-clip.yaml",
            "sweep/val_loss_vs_lr_clip.png"} <= artifacts

    best = load_config(str(result.best_config_path))
    assert result.best_config_path == tmp_path / "outputs/sweep/best-clip.yaml"
    assert best.clip.optim.lr == 2e-3 and best.run_name == "sweep"
    assert best.storage_root == config.storage_root  # ready to train with, not a trial's

    # the finished sweep is not silently mixed with a new one; --resume restores it
    with pytest.raises(SweepError, match="--resume"):
        run_lr_sweep(config, stage="clip", num_samples=1, extra_space=space)
    again = run_lr_sweep(config, stage="clip", num_samples=1, resume=True, extra_space=space)
    assert again.sweep_id == result.sweep_id and again.parent_run_id == result.parent_run_id
    assert [row["status"] for row in again.rows] == [row["status"] for row in result.rows]


def save_small_pipeline(directory) -> None:
    """A random pipeline at the tiny config's 32x32, cheap to sample (2 steps, 8 channels)."""
    from models.clip_model import build_clip
    from models.decoder import DecoderConfig, UnCLIPDecoder
    from models.prior import PriorConfig, UnCLIPPrior
    from models.unclip_pipeline import UnCLIPPipeline

    torch.manual_seed(1)
    clip = build_clip("shapes-tiny", context_length=32, embed_dim=32, text_layers=1)
    prior = UnCLIPPrior(config=PriorConfig(clip_embed_dim=32, text_width=64, context_length=32,
                                           width=32, layers=1, heads=2, num_timesteps=10))
    decoder = UnCLIPDecoder(config=DecoderConfig(
        image_size=32, clip_embed_dim=32, base_channels=8, channel_mults=(1, 2),
        num_res_blocks=1, attention_resolutions=(), head_channels=8, num_timesteps=10))
    UnCLIPPipeline(clip=clip, prior=prior, decoder=decoder, context_length=32,
                   sampling={"prior_steps": 2, "steps": 2, "num_candidates": 1,
                             "decoder_guidance": 1.25}).save(directory)  # not a swept scale


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_guidance_sweep_logs_metrics_plot_and_tags_model_version(tmp_path):
    from orchestration.registry.registry import register_pipeline
    from tuning.guidance_sweep import BEST_DECODER_TAG, run_guidance_sweep

    config = load_config("tiny", [
        f"data.uri={tmp_path}/shapes", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        f"storage_root={tmp_path}/runs", "data.shapes.train_size=32",
        "data.shapes.test_size=16", "data.shapes.samples_per_shard=16", "eval.num_captions=8",
        f"eval.evaluator.uri={tmp_path}/evaluator", "eval.bootstrap_reps=100"])
    save_small_pipeline(tmp_path / "pipeline")
    save_random_evaluator(tmp_path / "evaluator")
    version = register_pipeline(
        tmp_path / "pipeline", tracking_uri=config.mlflow.tracking_uri, model_name="tiny-guid",
        metrics={}, component_runs={}, dataset_uri=config.data.uri, manifest_hash="h",
        experiment=config.mlflow.experiment)

    result = run_guidance_sweep("models:/tiny-guid@candidate", config=config,
                                decoder_scales=[1.0, 2.0, 3.0], objective="fd_clip:min")
    scales = [row["decoder_guidance"] for row in result["results"]]
    assert scales == [1.0, 2.0, 3.0]
    # one Ray Tune trial per scale, each with its result and checkpointed images
    trials = sorted((tmp_path / "runs").glob("*-guidance-*/*/result.json"))
    assert len(trials) == 3
    assert len(list((tmp_path / "runs").glob("*-guidance-*/*/checkpoint_*/images.npy"))) == 3
    fds = [row["fd_clip"] for row in result["results"]]
    assert all(math.isfinite(v) for v in fds) and result["best"]["fd_clip"] == min(fds)

    client = MlflowClient(config.mlflow.tracking_uri)
    run = client.get_run(result["run_id"])
    for key in ("fd_clip", "kid_clip", "precision", "recall", "f1", "clip_score", "r_precision",
                "attr_colour_shape"):
        history = client.get_metric_history(result["run_id"], key)
        assert sorted(m.step for m in history) == [0, 1, 2], key
        assert f"best/{key}" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(result["run_id"], "guidance")}
    assert {"guidance/metrics_vs_scale.png", "guidance/samples_by_scale.png",
            "guidance/scales.csv"} <= artifacts
    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert len(children) == 3
    tags = client.get_model_version("tiny-guid", str(version)).tags
    assert float(tags[BEST_DECODER_TAG]) == result["best"]["decoder_guidance"]
    assert tags["guidance_sweep.run_id"] == result["run_id"]
    assert "best_prior_guidance" not in tags  # only the decoder scale was swept
    assert run.data.params["evaluator"].startswith("evaluator@")

    # the same sweep as an Optuna search over the continuous range [1, 3]
    searched = run_guidance_sweep("models:/tiny-guid@candidate", config=config,
                                  decoder_scales=[1.0, 3.0], objective="r_precision:max",
                                  search="optuna", num_trials=2)
    scales = [row["decoder_guidance"] for row in searched["results"]]
    assert len(scales) == 2 and all(1.0 <= s <= 3.0 for s in scales)
    assert scales == sorted(scales) and not set(scales) & {1.0, 3.0}
    assert searched["best"]["r_precision"] == max(r["r_precision"] for r in searched["results"])


    # loaders of that version now default to the chosen scale; the saved folder is untouched
    from models.unclip_pipeline import UnCLIPPipeline
    from orchestration.registry.registry import resolve_model_uri

    loaded = UnCLIPPipeline.load(resolve_model_uri(f"models:/tiny-guid/{version}",
                                                   tracking_uri=config.mlflow.tracking_uri))
    assert loaded.sampling.decoder_guidance == searched["best"]["decoder_guidance"]
    assert UnCLIPPipeline.load(tmp_path / "pipeline").sampling.decoder_guidance == 1.25


def test_optuna_search_needs_a_range():
    from tuning.guidance_space import search_space

    goal = parse_objective("fd_clip")
    with pytest.raises(ConfigError, match="give the decoder range as two scales"):
        search_space("optuna", [2.0], None, goal, 8)
    with pytest.raises(ConfigError, match="--search 'random': use grid or optuna"):
        from tuning.guidance_sweep import run_guidance_sweep

        run_guidance_sweep("models:/x@y", config=load_config("tiny", []), decoder_scales=[1.0],
                           search="random")
    assert search_space("optuna", [1.0, 3.0], None, goal, 4).param_space([1.0])[
        "prior_guidance"] == 1.0

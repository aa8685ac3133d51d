"""Where a run's outputs live in storage (local folder or S3), so later stages, the pipeline
and other nodes find them without being told:
    <storage_root>/<run_name>/<stage>/checkpoint_*/   Ray Train checkpoints (DeepSpeed shards)
    <storage_root>/<run_name>/<stage>/inputs/         driver-side inputs a task's workers read
    <storage_root>/<run_name>/<stage>/portable/       EMA fp32 weights + config (the export)
    <storage_root>/<run_name>/pipeline/eval/          metrics, grids, the saved pipeline
    <storage_root>/<run_name>/pipeline/register/      the registered version
A stage (or pipeline step) is complete when its `DONE.json` exists: it is deleted before its
outputs are rewritten and written after them, so a half-written output is never taken for a
complete one. A stage's DONE.json records the steps it trained; asking for more steps
continues it from its latest checkpoint. Markers live beside their outputs, never in a job's
working directory, so a job resubmitted on another node sees them.
"""

from __future__ import annotations

import json

from data_pipelines.storage import StorageError, resolve

PORTABLE_DIR = "portable"
INPUTS_DIR = "inputs"
PIPELINE_DIR = "pipeline"
DONE_FILE = "DONE.json"


def stage_uri(config, stage: str) -> str:
    return f"{config.storage_root.rstrip('/')}/{config.run_name}/{stage}"


def portable_uri(config, stage: str) -> str:
    return f"{stage_uri(config, stage)}/{PORTABLE_DIR}"


def inputs_uri(config, stage: str) -> str:
    return f"{stage_uri(config, stage)}/{INPUTS_DIR}"


def pipeline_step_uri(config, step: str) -> str:
    """Outputs and DONE marker of one of the pipeline's own steps (eval, register)."""
    return f"{stage_uri(config, PIPELINE_DIR)}/{step}"


def stage_done(config, stage: str) -> bool:
    return resolve(portable_uri(config, stage)).join(DONE_FILE).exists()


def trained_steps(config, stage: str) -> int | None:
    """The steps a complete stage trained (None while it is not complete). Markers written
    before the step was recorded count as the configured steps."""
    done = resolve(portable_uri(config, stage)).join(DONE_FILE)
    if not done.exists():
        return None
    step = json.loads(done.read_text()).get("step")
    return int(step) if step is not None else getattr(config, stage).steps


def adopted_from(config, stage: str) -> str | None:
    """Where a complete `steps: 0` stage took its weights from (None for a trained one)."""
    done = resolve(portable_uri(config, stage)).join(DONE_FILE)
    return json.loads(done.read_text()).get("adopted_from") if done.exists() else None


def require_stage(config, stage: str, needed_by: str) -> str:
    """The portable weights of a finished `stage`, or one line saying how to make them."""
    uri = portable_uri(config, stage)
    if not stage_done(config, stage):
        raise StorageError(
            f"{needed_by} needs trained {stage} weights at {uri}; run `unclip train {stage}` "
            f"with the same run_name ({config.run_name}) first")
    return uri

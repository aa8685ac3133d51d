"""The one YAML config schema, validated before any cluster resource is taken.

`load_config(path, overrides)` reads a YAML file, applies `--set a.b=c` overrides, validates
with pydantic and turns every error into one `ConfigError` line naming the key and the fix.
Relative local paths are made absolute against the current directory at load time, so Ray
workers (whose working directory differs) write to the same place the user asked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from data_pipelines.settings import PreprocessSettings, ShapesSettings
from data_pipelines.storage import has_credentials, is_s3_uri
from orchestration.stages import STAGES

REPO_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "tiny"


class ConfigError(ValueError):
    """A config problem, phrased as one line a user can act on."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(Strict):
    address: str | None = None  # None: $RAY_ADDRESS if set, else a local Ray instance
    num_cpus: int | None = Field(None, ge=1)  # cap for a local instance only


class DataConfig(Strict):
    uri: str = "data/shapes"
    format: Literal["webdataset", "parquet"] = "webdataset"
    build_shapes_if_missing: bool = False
    shapes: ShapesSettings = ShapesSettings()
    preprocess: PreprocessSettings = PreprocessSettings()
    max_skip_fraction: float = Field(0.01, ge=0.0, le=1.0)
    embeddings_uri: str | None = None  # default: <uri>/embeddings
    embed_token_encodings: bool = True  # per-token CLIP text encodings for the prior
    # Each worker reads its shards this many at a time and shuffles their samples together:
    # more mixes a class-sorted dataset better, at the cost of memory and of what a resume
    # re-reads (at most one window)
    shuffle_window_shards: int = Field(8, ge=1)
    # A worker that gets no batch for this long fails in one line naming the CPUs its Ray
    # Data tasks wait for (e.g. other work or a sweep's other trials hold them), instead of
    # waiting for ever; the first batch of an epoch reads a whole window, so leave room
    stall_timeout_s: float = Field(600.0, gt=0)

    # `uri` as the user wrote it, before load_config made a relative path absolute: what
    # registered and released metadata record, so they carry no path of the building machine
    _given_uri: str | None = PrivateAttr(default=None)

    @property
    def resolved_embeddings_uri(self) -> str:
        return self.embeddings_uri or self.uri.rstrip("/") + "/embeddings"

    @property
    def given_uri(self) -> str:
        return self._given_uri or self.uri


class ScalingConfig(Strict):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(0, ge=-1)  # -1: retry forever
    # How long a run waits for its workers' resources (at start, and after losing a node)
    # before it fails in one line naming what is missing (each of 1 + max_failures tries);
    # rerunning continues it. Ray Train alone would wait forever. Leave room for an
    # autoscaler to add a node.
    resource_wait_s: float = Field(900.0, gt=0)
    torch_threads: int | None = Field(None, ge=1)  # None: Ray's default (one per worker CPU)
    # STRICT_SPREAD puts every worker on its own node (one worker per node)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    # a device's peak FLOP/s (TFLOP/s) for the `mfu` metric; None: the dense bf16 peak of a
    # known GPU (models/flops.py) when training in bf16, otherwise no MFU is logged
    peak_tflops: float | None = Field(None, gt=0)


class DeepSpeedConfig(Strict):
    zero_stage: int = Field(0, ge=0, le=3)
    offload_optimizer: bool = False
    offload_params: bool = False
    # auto: bf16 autocast on GPU, fp32 on CPU. bf16 keeps fp32 master weights (torch autocast).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # elements per ZeRO communication bucket (gradient reduce-scatter, allgather); each rank
    # holds a bucket-sized buffer, so it bounds the memory ZeRO adds besides model state
    bucket_elements: int = Field(50_000_000, ge=1_000_000)


class OptimConfig(Strict):
    lr: float = Field(3e-4, gt=0)  # Grazys 2023, sec. 4.2, fig. 5: 3e-4 best, > 1e-3 diverged
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    # Grazys 2023, sec. 4.2, fig. 6: no warm-up was best
    warmup_fraction: float = Field(0.0, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    ema_decay: float = Field(0.999, ge=0, lt=1)


class StageConfig(Strict):
    preset: str
    overrides: dict[str, Any] = {}
    batch_size: int = Field(64, ge=1)  # per worker
    # 0 with init_from: the stage takes init_from's weights as they are, untrained (e.g. a
    # release's CLIP and prior, so that only its decoder trains on)
    steps: int = Field(500, ge=0)
    grad_accum: int = Field(1, ge=1)
    optim: OptimConfig = OptimConfig()
    log_every: int = Field(20, ge=1)  # steps between loss/throughput lines and metrics
    # steps between evaluations (ASHA's rungs in sweeps); None: at every checkpoint
    eval_every: int | None = Field(None, ge=1)
    # steps between checkpoints; a multiple of eval_every, since checkpoints are ranked by
    # the validation loss of the evaluation made at the same step
    checkpoint_every: int = Field(250, ge=1)
    keep_checkpoints: int = Field(2, ge=1)  # best by validation loss
    init_from: str | None = None  # portable weights dir/file or models:/NAME@alias to fine-tune

    @property
    def evaluation_interval(self) -> int:
        return self.eval_every or self.checkpoint_every

    @model_validator(mode="after")
    def _check_cadence(self) -> StageConfig:
        if self.steps == 0 and not self.init_from:
            raise ValueError("steps is 0 without init_from; set steps >= 1 to train, or "
                             "init_from to take that model's weights untrained")
        if self.eval_every and self.checkpoint_every % self.eval_every:
            raise ValueError(
                f"checkpoint_every ({self.checkpoint_every}) must be a multiple of eval_every "
                f"({self.eval_every}): each checkpoint is ranked by the evaluation at its step")
        return self


class SamplingConfig(Strict):
    sampler: Literal["ddpm", "ddim"] = "ddim"
    prior_steps: int | None = Field(None, ge=1)
    decoder_steps: int | None = Field(50, ge=1)
    prior_guidance: float = Field(1.0, ge=0)
    # Luo 2023, sec. 4.2, fig. 4.3: best FID/KID at 2..2.5
    decoder_guidance: float = Field(2.0, ge=0)
    eta: float = Field(0.0, ge=0)
    num_candidates: int = Field(2, ge=1)  # best-of-N prior samples (Luo 2023, algorithm 5)


class EvaluatorConfig(Strict):
    # "auto": a CLIP trained once for the dataset (keyed by its manifest hash) and reused;
    # otherwise a folder or s3:// prefix of portable CLIP weights (e.g. release/shapes/evaluator)
    uri: str = "auto"
    # its own seed: with the same recipe as the model's CLIP it is still a separate judge,
    # not a copy of the CLIP under test
    seed: int = 1
    # how "auto" trains it: bigger and longer than a demo's CLIP, so it judges, not guesses
    clip: StageConfig = StageConfig(
        preset="shapes-paper", batch_size=128, steps=3000, checkpoint_every=500,
        optim=OptimConfig(lr=5e-4, weight_decay=0.1, warmup_fraction=0.02))


GATE_METRICS = ("clip_score", "r_precision", "attr_colour_shape")


class EvalConfig(Strict):
    num_captions: int = Field(32, ge=2)
    images_per_caption: int = Field(1, ge=1)
    evaluator: EvaluatorConfig = EvaluatorConfig()
    r_precision_candidates: int = Field(32, ge=2)  # own caption + 31 others (Park et al. 2021)
    # the per-caption score the paired promotion gate compares (higher is better)
    gate_metric: Literal["clip_score", "r_precision", "attr_colour_shape"] = "clip_score"
    bootstrap_reps: int = Field(1000, ge=100)
    # one-object captions rephrased and cut to shape or colour only (Luo 2023, sec. 4.6.4)
    zero_shot_captions: int = Field(64, ge=0)
    grid_prompts: list[str] = [
        "a large red circle",
        "a small blue square",
        "a green triangle and a yellow ellipse",
        "a medium purple pentagon",
    ]


class MlflowConfig(Strict):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "unclip"
    registered_model: str = "unclip-shapes"


class Config(Strict):
    run_name: str = Field("unclip", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    storage_root: str = "runs"  # checkpoints and outputs: local folder or s3://bucket/prefix
    ray: RayConfig = RayConfig()
    data: DataConfig = DataConfig()
    scaling: ScalingConfig = ScalingConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    clip: StageConfig = StageConfig(preset="shapes-tiny")
    prior: StageConfig = StageConfig(preset="shapes-tiny")
    decoder: StageConfig = StageConfig(preset="shapes-tiny")
    # sections of stages registered outside orchestration.stages (orchestration.stages.
    # register_task); the built-in stages have their own sections above
    extra_stages: dict[str, StageConfig] = {}
    sampling: SamplingConfig = SamplingConfig()
    eval: EvalConfig = EvalConfig()
    mlflow: MlflowConfig = MlflowConfig()

    @model_validator(mode="after")
    def _check_combinations(self) -> Config:
        ds = self.deepspeed
        if ds.offload_params and ds.zero_stage != 3:
            raise ValueError(
                "deepspeed.offload_params: parameter offload needs zero_stage 3; "
                "set deepspeed.zero_stage=3 or offload_params=false"
            )
        if ds.offload_optimizer and ds.zero_stage == 0:
            raise ValueError(
                "deepspeed.offload_optimizer: optimizer offload needs zero_stage >= 1"
            )
        if self.clip.batch_size * self.scaling.num_workers < 2:
            raise ValueError(
                "clip.batch_size: CLIP's contrastive loss needs at least 2 image-text pairs per "
                "step over all workers (clip.batch_size x scaling.num_workers is 1); "
                "set clip.batch_size >= 2"
            )
        if self.data.shapes.include_position and self.data.preprocess.hflip:
            raise ValueError(
                "data.preprocess.hflip: flipping swaps left and right in position captions; "
                "set data.preprocess.hflip=false or data.shapes.include_position=false"
            )
        if has_credentials(self.mlflow.tracking_uri):
            raise ValueError(
                "mlflow.tracking_uri: credentials in the URI; put them in "
                "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
            )
        uris = {**self.storage_uris(), "ray.address": self.ray.address or ""}
        for name in STAGES:
            uris[f"{name}.init_from"] = self.stage(name).init_from or ""
        for name, uri in uris.items():
            if has_credentials(uri):
                raise ValueError(
                    f"{name}: credentials in the URI; give them through the environment "
                    "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, RAY_AUTH_TOKEN), never a config"
                )
        return self

    def storage_uris(self) -> dict[str, str]:
        return {
            "data.uri": self.data.uri,
            "data.embeddings_uri": self.data.resolved_embeddings_uri,
            "storage_root": self.storage_root,
        }

    def stage(self, name: str) -> StageConfig:
        if name in STAGES:
            return getattr(self, name)
        if name in self.extra_stages:
            return self.extra_stages[name]
        raise ConfigError(f"no config section for stage {name!r}; add extra_stages.{name}")


def resolve_config_path(path: str | os.PathLike | None) -> Path:
    """A file path, or the name of a config shipped in the repo's configs/ ("tiny")."""
    raw = str(path) if path is not None else DEFAULT_CONFIG
    candidate = Path(raw)
    if candidate.is_file():
        return candidate
    for shipped in (REPO_CONFIG_DIR / raw, REPO_CONFIG_DIR / f"{raw}.yaml",
                    REPO_CONFIG_DIR / candidate.name):
        if shipped.is_file():
            return shipped
    known = ", ".join(sorted(p.stem for p in REPO_CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config file not found: {raw} (shipped configs: {known})")


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set clip.steps=100")
    key, _, value = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty key segment in {key!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def _default_section(path: list[str]) -> dict:
    """The schema's default for the section at `path`, as a dict ({} where it has none), so
    that `--set a.b.c=1` on a section the file leaves out changes one key of its defaults
    rather than replacing them all."""
    node: Any = Config
    for part in path:
        if isinstance(node, BaseModel):
            node = getattr(node, part, None)
        elif isinstance(node, type) and issubclass(node, BaseModel) and part in node.model_fields:
            field = node.model_fields[part]
            default = field.get_default(call_default_factory=True)
            node = default if isinstance(default, BaseModel) else field.annotation
        else:
            return {}
    return node.model_dump(mode="json") if isinstance(node, BaseModel) else {}


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = _default_section(parts[:depth + 1])
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return (
            f"config error in {source}: unknown key '{key}'; remove it or check the spelling "
            f"(see configs/tiny.yaml for every key)"
        )
    msg = first["msg"].removeprefix("Value error, ")
    if key == "(top level)":
        return f"config error in {source}: {msg}"
    if first["type"] == "value_error":  # a section's own check: name the section
        return f"config error in {source}: {key}: {msg}"
    got = first.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return (f"config error in {source}: {key}: {msg}{shown}; "
            f"fix it in the file or with --set {key}=...")


def _absolutise(uri: str) -> str:
    if is_s3_uri(uri) or "://" in uri:
        return uri
    return str(Path(uri).expanduser().absolute())


def _absolutise_sqlite(uri: str) -> str:
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).absolute())
    if "://" not in uri:  # a bare folder: MLflow's file store
        return str(Path(uri).absolute())
    return uri


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                *, absolute_paths: bool = True, check_models: bool = True) -> Config:
    config_path = resolve_config_path(path)
    try:
        raw = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise ConfigError(f"config file {config_path}{where} is not valid YAML") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {config_path} must be a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    try:
        config = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, str(config_path))) from None
    if check_models:
        check_model_sections(config, str(config_path))
    if absolute_paths:
        config = absolutised(config)
    return config


def check_model_sections(config: Config, source: str) -> None:
    """Each stage's own check of its section (preset, override keys, limits that depend on
    the model, e.g. sampling steps <= the model's timesteps). Imports the model code, so it
    runs after the cheap checks above."""
    from orchestration.stages import task_class

    for name in STAGES:
        try:
            task_class(name).check_config(config)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"config error in {source}: {name}: {exc}") from None


def absolutised(config: Config) -> Config:
    data = config.model_copy(deep=True)
    data.data._given_uri = data.data.given_uri
    data.data.uri = _absolutise(data.data.uri)
    if data.data.embeddings_uri:
        data.data.embeddings_uri = _absolutise(data.data.embeddings_uri)
    data.storage_root = _absolutise(data.storage_root)
    data.mlflow.tracking_uri = _absolutise_sqlite(data.mlflow.tracking_uri)
    return data


def flatten(config: Config) -> dict[str, str]:
    """Dotted key -> string value, for MLflow params (values cut to MLflow's 500 chars)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = str(value)[:500]

    walk("", config.model_dump(mode="json"))
    return out


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)

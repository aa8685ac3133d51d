"""The task contract (`Task`), plus what every task shares: portable weights, tensors, data.

Portable weights are `config.json` ({"component": stage, "config": ...}) and
`weights.safetensors` in a local folder or under an s3:// prefix, so every worker of a
multi-node job can read them and serving can rebuild the model without DeepSpeed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from data_pipelines.storage import resolve
from orchestration.config import Config, StageConfig
from orchestration.stages import task_class


@dataclass
class EvalResult:
    metrics: dict[str, float]  # must hold "val_loss": checkpoints are ranked by it
    images: dict[str, Image.Image] = field(default_factory=dict)  # logged as PNG


class LossModule(nn.Module):
    """`forward(batch) -> loss terms`, so DeepSpeed sees one forward per step (its ZeRO-3
    hooks gather parameters around forward calls, so the loss is computed inside one)."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self._loss_fn(self.model, batch)


class Task:
    """One training stage. Subclasses set `name` and implement the methods marked abstract.

    The same class runs on the driver (constructed with the config only) and in every Ray
    Train worker (then `setup` is called first with the worker's device and rank).
    """

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()  # stages whose portable weights this one reads
    # "images": image-caption shards (decoded by Ray Data, bad records budgeted);
    # "embeddings": the CLIP embedding shards written by `unclip embed`
    dataset_kind: ClassVar[Literal["images", "embeddings"]] = "images"
    image_columns: ClassVar[tuple[str, ...]] = ("image", "tokens")  # train columns kept
    # (class, method name) of library code in `build_model` that initialises the parameters
    # of child modules built before it; under ZeRO-3, where each module is partitioned as
    # soon as it is built, these run on gathered parameters (`partitioned_construction`)
    child_inits: ClassVar[tuple[tuple[type, str], ...]] = ()

    def __init__(self, config: Config):
        self.config = config
        self.stage: StageConfig = config.stage(self.name)

    # --- driver side ------------------------------------------------------------------------
    @classmethod
    def check_config(cls, config: Config) -> None:
        """Raise ValueError (one line naming the key and the fix) for a section this stage
        cannot train with: unknown preset or override key, limits that depend on the model.
        Runs when the config is loaded, before Ray starts."""

    def train_samples(self, manifest) -> int:
        """Samples in one epoch of the train split (plans epochs and the `epoch` metric)."""
        return manifest.splits["train"].num_samples

    def datasets(self, counter) -> dict:
        """{"train": a `TrainStream` each worker opens at its own position, "test": a Ray
        dataset}; `counter` budgets unreadable records."""
        from orchestration.train.tasks.data import image_datasets

        return image_datasets(self.config, self.image_columns, counter)

    def prepare(self) -> None:
        """Write what the workers need beyond the datasets into storage (default: nothing)."""

    # --- worker side ------------------------------------------------------------------------
    def setup(self, *, device: torch.device, rank: int = 0, world_size: int = 1) -> None:
        """Heavy per-worker state (frozen upstream models, a distributed loss)."""
        self.device = device

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def model_config(self, model: nn.Module) -> dict:
        """What `model_from_config` needs to rebuild `model` (stored with portable weights)."""
        return model.config

    @classmethod
    def model_from_config(cls, config: dict) -> nn.Module:
        raise NotImplementedError

    def to_batch(self, raw: dict, device: torch.device) -> dict:
        """A numpy batch from Ray Data -> the tensors `compute_loss` and `evaluate` take."""
        raise NotImplementedError

    def compute_loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """Loss terms; "loss" is optimised, the rest are logged."""
        raise NotImplementedError

    def after_step(self, model: nn.Module, *, zero_stage: int) -> None:
        """Called after every optimizer step (e.g. CLIP clamps its logit scale)."""

    def evaluate(self, model: nn.Module, batches: list[dict]) -> EvalResult:
        """Metrics of the EMA weights on a fixed set of test batches (rank 0 only)."""
        raise NotImplementedError


def to_tensor(array, device) -> torch.Tensor:
    # Ray hands out read-only views of its blocks; copy only when torch would need one
    array = np.require(array, requirements=["C_CONTIGUOUS", "WRITEABLE"])
    return torch.from_numpy(array).to(device, non_blocking=True)


def read_portable_config(uri: str) -> dict:
    return json.loads(resolve(uri).join("config.json").read_text())


def read_portable_weights(uri: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(resolve(uri).join("weights.safetensors").read_bytes())


def load_portable(uri: str, map_location="cpu") -> tuple[str, nn.Module]:
    """(stage name, module) from portable weights at a local folder or s3:// prefix."""
    meta = read_portable_config(uri)
    module = task_class(meta["component"]).model_from_config(meta["config"])
    module.load_state_dict(read_portable_weights(uri))
    return meta["component"], module.to(map_location)


@torch.no_grad()
def load_portable_into(model: nn.Module, uri: str, *, zero_stage: int) -> None:
    """Portable weights into a freshly built `model` (fine-tuning's `init_from`).

    Under ZeRO-3 the model was partitioned as it was built: rank 0 alone reads the weights
    and fills one module's gathered parameters at a time, which are scattered back to every
    rank's partitions (the loading recipe of DeepSpeed's `GatheredParameters` docs); buffers,
    which ZeRO does not partition, are broadcast. No rank builds a second model."""
    if zero_stage != 3:
        model.load_state_dict(read_portable_weights(uri))
        return
    import deepspeed
    import torch.distributed as dist

    chief = dist.get_rank() == 0
    state = read_portable_weights(uri) if chief else {}
    problem = [_mismatch(model, state) if chief else None]
    dist.broadcast_object_list(problem, src=0)  # every rank raises, none waits for rank 0
    if problem[0]:
        raise ValueError(f"cannot start from {uri}: {problem[0]}")
    persistent = model.state_dict().keys()
    for prefix, module in model.named_modules():
        params = dict(module.named_parameters(prefix, recurse=False))
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            for name, param in params.items():
                if chief:
                    param.copy_(state[name])
        for name, buffer in module.named_buffers(prefix, recurse=False):
            if name in persistent:
                if chief:
                    buffer.copy_(state[name])
                dist.broadcast(buffer, src=0)


def _mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """What differs between `model`'s tensors (full shapes, also when partitioned) and `state`."""
    expected = {k: tuple(getattr(v, "ds_shape", v.shape))
                for k, v in model.state_dict(keep_vars=True).items()}
    differ = sorted(k for k in expected.keys() | state.keys()
                    if k not in state or expected.get(k) != tuple(state[k].shape))
    return f"names or shapes differ from the model's: {differ[:5]}" if differ else None


def save_portable(uri: str, component: str, module: nn.Module, config: dict) -> None:
    from safetensors.torch import save

    root = resolve(str(uri))
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    root.join("weights.safetensors").write_bytes(save(state))
    root.join("config.json").write_text(
        json.dumps({"component": component, "config": config}, indent=2))

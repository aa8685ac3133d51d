"""DeepSpeed engine construction: config dict, optimizer, warm-up + cosine LR schedule, EMA."""

from __future__ import annotations

import functools
import math
from contextlib import ExitStack, contextmanager

import torch
import torch.distributed as dist
from torch import nn

from orchestration.config import DeepSpeedConfig, StageConfig


def resolved_precision(deepspeed: DeepSpeedConfig, use_gpu: bool) -> str:
    # bf16 is emulated (and ~20x slower) on CPUs without AVX-512 BF16, so "auto" means fp32 there
    if deepspeed.precision == "auto":
        return "bf16" if use_gpu else "fp32"
    return deepspeed.precision


def deepspeed_config(stage: StageConfig, deepspeed: DeepSpeedConfig, *, use_gpu: bool) -> dict:
    zero: dict = {"stage": deepspeed.zero_stage}
    if deepspeed.zero_stage:
        # DeepSpeed allocates its gradient-reduction bucket whole: its default of 5e8 elements
        # is 2 GB of fp32 per rank, more than a 150M-parameter model's own gradients
        zero.update(reduce_bucket_size=deepspeed.bucket_elements,
                    allgather_bucket_size=deepspeed.bucket_elements)
    if deepspeed.zero_stage == 3:
        # ... and by default keeps up to 1e9 gathered parameters alive: the whole model
        zero.update(stage3_max_live_parameters=deepspeed.bucket_elements,
                    stage3_max_reuse_distance=deepspeed.bucket_elements,
                    stage3_prefetch_bucket_size=deepspeed.bucket_elements)
    if deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if deepspeed.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": stage.batch_size,
        "gradient_accumulation_steps": stage.grad_accum,
        "gradient_clipping": stage.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # our loop does the logging
        "wall_clock_breakdown": False,
    }
    if resolved_precision(deepspeed, use_gpu) == "bf16":
        # torch autocast keeps fp32 master weights; DeepSpeed's "bf16" mode would cast the model
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return config


def build_optimizer(model: nn.Module, stage: StageConfig,
                    deepspeed: DeepSpeedConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # norms, biases, embeddings and scalars (logit_scale) are not weight-decayed
        ndim = len(getattr(param, "ds_shape", param.shape))  # ZeRO-3 partitions are flat
        (no_decay if ndim < 2 or "embedding" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": stage.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"lr": stage.optim.lr, "betas": stage.optim.betas}
    if deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    # on CUDA, one fused kernel updates every tensor of a group (torch's `fused` AdamW)
    # instead of a chain of elementwise launches per step
    fused = bool(decay + no_decay) and all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def warmup_cosine(step: int, *, total_steps: int, warmup_fraction: float,
                  min_lr_ratio: float) -> float:
    """LR multiplier: linear warm-up, then cosine decay to `min_lr_ratio` (the schedule of
    Grazys 2023, sec. 3.4)."""
    warmup = int(total_steps * warmup_fraction)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return min_lr_ratio + (1 - min_lr_ratio) * cosine


@contextmanager
def partitioned_construction(ds_config: dict, zero_stage: int, child_inits=()):
    """Build models inside this block. Under ZeRO-3 each module is partitioned across the
    ranks as soon as its own __init__ returns (`deepspeed.zero.Init`; Rajbhandari et al.
    2020, sec. 5), so no rank ever holds the whole model; elsewhere it does nothing.

    `child_inits`, (class, method name) pairs, are library methods that initialise the
    parameters of child modules built before them (already partitioned, so the init would
    miss them): they run with the module's parameters gathered and rank 0's result scattered
    back, as DeepSpeed's docs prescribe for such inits (`GatheredParameters`, modifier_rank).
    Random draws are then the same as without ZeRO, so the initial weights are too."""
    if zero_stage != 3:
        yield
        return
    import deepspeed
    from deepspeed.runtime.zero import DeepSpeedTensorOverride

    with ExitStack() as stack:
        for cls, name in child_inits:
            stack.enter_context(_method_replaced(cls, name, _gathered(getattr(cls, name))))
        # device only: the default also casts every float tensor built inside, which would
        # turn the diffusion schedules' float64 into float32
        stack.enter_context(deepspeed.zero.Init(
            config_dict_or_path=ds_config, tensor_overrides=[DeepSpeedTensorOverride.device]))
        yield


@contextmanager
def _method_replaced(cls: type, name: str, replacement):
    """`cls.name` is `replacement` inside the block; the class is restored as it was after,
    also when the method was inherited rather than defined on `cls` itself."""
    own = name in cls.__dict__
    original = cls.__dict__.get(name)
    setattr(cls, name, replacement)
    try:
        yield
    finally:
        if own:
            setattr(cls, name, original)
        else:
            delattr(cls, name)


def _gathered(method):
    @functools.wraps(method)
    def run(module: nn.Module, *args, **kwargs):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
            return method(module, *args, **kwargs)

    return run


def clamp_parameter_(param: nn.Parameter, low: float, high: float, zero_stage: int) -> None:
    """Clamp a parameter in place, in the model and, under ZeRO 1-3, in the optimizer's fp32
    master copy too: the next step copies the master over the model's value, so clamping
    the model alone would not hold. Under ZeRO-3 each rank clamps the partition it owns
    (no gather; the padding past the end of a parameter is never read)."""
    with torch.no_grad():
        if zero_stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

            param.ds_tensor.clamp_(low, high)
            master = safe_get_local_fp32_param(param)
            if master is not None:
                safe_set_local_fp32_param(param, master.clamp(low, high))
            return
        param.clamp_(low, high)
    if zero_stage > 0:
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        master = safe_get_full_fp32_param(param)
        if master is not None:
            safe_set_full_fp32_param(param, master.clamp(low, high))


def model_state_bytes(engine, ema: EMA) -> int:
    """Bytes of model state this rank holds: parameters (and their ZeRO-3 partitions),
    gradients, the optimizer's master weights and state (the model states of Rajbhandari et
    al. 2020, sec. 3.1) and the EMA. Each storage counts once: DeepSpeed's parameters and
    partitions are views into flat buffers, and its fp32 master partition shares the
    weights' storage when they are fp32. Buffers that only carry communication (gradient
    buckets) are not model state. Call it during an optimizer step, when gradients and
    optimizer state are both held (`TrainLoop` does, once)."""
    tensors = list(ema.shadow.values())
    for param in engine.module.parameters():
        tensors += [param.data, param.grad, getattr(param, "ds_tensor", None)]
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # inside ZeRO's
    for group in optimizer.param_groups:
        tensors += [t for master in group["params"] for t in (master, master.grad)]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    storages = {}
    for tensor in tensors:
        if tensor is not None and tensor.numel():
            storage = tensor.untyped_storage()
            storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


class EMA:
    """Exponential moving average of the weights (Zbinden 2022, sec. 4.2.3), in fp32.

    At ZeRO 0-2 every rank holds the full weights and the full average. Under ZeRO-3 each
    rank averages only the partition of every parameter it owns (`param.ds_tensor`), so the
    average is sharded like the weights and an update needs no communication; `copy_to`
    gathers it when a full copy is needed (evaluation, portable export).
    """

    def __init__(self, module: nn.Module, *, decay: float, zero_stage: int):
        self.decay, self.sharded = decay, zero_stage == 3
        self.shadow = {n: self._local(p).detach().float().clone()
                       for n, p in module.named_parameters()}

    def _local(self, param: nn.Parameter) -> torch.Tensor:
        """The part of `param` this rank keeps: its ZeRO-3 partition, or all of it."""
        return param.ds_tensor if self.sharded else param

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        # a short effective horizon early on, so the average is not stuck at the init
        decay = min(self.decay, (1 + step) / (10 + step))
        names, params = zip(*module.named_parameters(), strict=True)
        torch._foreach_lerp_([self.shadow[n] for n in names],
                             [self._local(p).detach().float() for p in params], 1 - decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        shadow = {k: v.float() for k, v in state["shadow"].items()}
        if {k: v.shape for k, v in shadow.items()} != {k: v.shape for k, v in self.shadow.items()}:
            raise ValueError("the saved EMA does not match this model and its partitioning")
        self.shadow = shadow

    @torch.no_grad()
    def copy_to(self, target: nn.Module | None, source: nn.Module) -> None:
        """Load the average plus `source`'s buffers into the plain (non-DeepSpeed) module
        `target` on rank 0 (None on the other ranks). Under ZeRO-3 every rank must call it:
        the partitions are gathered to rank 0, one parameter at a time."""
        for name, param in source.named_parameters():
            full = self._gather(param, self.shadow[name]) if self.sharded else self.shadow[name]
            if target is not None:
                target.get_parameter(name).copy_(full)
        if target is not None:
            persistent = target.state_dict().keys()  # skips non-persistent buffers (attn masks)
            for name, buffer in source.named_buffers():
                if name in persistent:
                    target.get_buffer(name).copy_(buffer)

    @staticmethod
    def _gather(param: nn.Parameter, shard: torch.Tensor) -> torch.Tensor | None:
        """`param`'s full average on rank 0 from every rank's `shard` of it (None elsewhere).
        Rank r's ZeRO-3 partition is the r-th equal slice of the flattened parameter, padded
        at the end (DeepSpeed partitions over all ranks here: no MiCS or hpZ groups)."""
        chief = dist.get_rank() == 0
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size())] if chief else None
        dist.gather(shard, parts, dst=0)
        return torch.cat(parts)[:param.ds_numel].view(param.ds_shape) if chief else None

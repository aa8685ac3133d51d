"""DeepSpeed engine construction: config dict, optimizer, warm-up + cosine LR schedule, EMA."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from orchestration.config import DeepSpeedConfig, StageConfig


def resolved_precision(deepspeed: DeepSpeedConfig, use_gpu: bool) -> str:
    # bf16 is emulated (and ~20x slower) on CPUs without AVX-512 BF16, so "auto" means fp32 there
    if deepspeed.precision == "auto":
        return "bf16" if use_gpu else "fp32"
    return deepspeed.precision


def deepspeed_config(stage: StageConfig, deepspeed: DeepSpeedConfig, *, use_gpu: bool) -> dict:
    zero: dict = {"stage": deepspeed.zero_stage}
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
        (no_decay if param.ndim < 2 or "embedding" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": stage.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"lr": stage.optim.lr, "betas": stage.optim.betas}
    if deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


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


def gathered(module: nn.Module, zero_stage: int):
    """Full parameters inside the block, also under ZeRO-3 partitioning."""
    if zero_stage != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def gathered_for_update(params: list[nn.Parameter], zero_stage: int):
    """Full `params` inside the block; under ZeRO-3 rank 0's in-place changes are written
    back to the owning partitions on exit (every rank must enter the block)."""
    if zero_stage != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def clamp_parameter_(param: nn.Parameter, low: float, high: float, zero_stage: int) -> None:
    """Clamp a parameter in place, in the model and, under ZeRO 1-3, in the optimizer's fp32
    master copy too: the next step copies the master over the model's value, so clamping
    the model alone would not hold. Every rank must call it (ZeRO-3 gathers)."""
    with gathered_for_update([param], zero_stage), torch.no_grad():
        param.clamp_(low, high)
    if zero_stage > 0:
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        master = safe_get_full_fp32_param(param)
        if master is not None:
            safe_set_full_fp32_param(param, master.clamp(low, high))


class EMA:
    """Exponential moving average of the weights (Zbinden 2022, sec. 4.2.3), kept in fp32
    on every rank.

    Under ZeRO-3 the update gathers the partitioned parameters, so `update_every` > 1 is
    worth setting for large models; the average is then over every N-th step.
    """

    def __init__(self, module: nn.Module, *, decay: float, zero_stage: int):
        self.decay, self.zero_stage = decay, zero_stage
        with gathered(module, zero_stage):
            self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        # a short effective horizon early on, so the average is not stuck at the init
        decay = min(self.decay, (1 + step) / (10 + step))
        with gathered(module, self.zero_stage):
            names, params = zip(*module.named_parameters(), strict=True)
            torch._foreach_lerp_([self.shadow[n] for n in names],
                                 [p.detach().float() for p in params], 1 - decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {k: v.float() for k, v in state["shadow"].items()}

    @torch.no_grad()
    def copy_to(self, target: nn.Module, source: nn.Module) -> nn.Module:
        """Load EMA weights plus `source`'s buffers into a plain (non-DeepSpeed) module."""
        persistent = target.state_dict().keys()  # skips non-persistent buffers (attn masks)
        buffers = {n: b.detach().clone() for n, b in source.named_buffers() if n in persistent}
        state = {**self.shadow, **buffers}
        target.load_state_dict(state, strict=True)
        return target

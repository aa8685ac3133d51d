"""FLOPs of a training step and model FLOPs utilisation (MFU).

MFU is the share of the hardware's peak that the model's own arithmetic uses: FLOPs of one
step divided by (step time x peak FLOP/s), as defined by Chowdhery et al. (2022, PaLM,
appendix B). The FLOPs are counted by torch's `FlopCounterMode` on one real forward and
backward pass, so no per-architecture formula is needed. Like PaLM's count it includes
matrix multiplies, convolutions and attention only: elementwise work (norms, activations,
the optimizer update) costs time but no counted FLOPs, which is what MFU is meant to show.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s. The first
# name found in a device's name wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
                    ("A10G", 125.0), ("A10", 125.0), ("L40S", 362.0), ("L4", 121.0))


def training_step_flops(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> int:
    """FLOPs of one forward + backward: `loss_fn(model)` builds the batch and returns the
    scalar loss. The gradients it leaves are dropped, so the model is as it was."""
    with FlopCounterMode(display=False) as counter:
        loss_fn(model).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def meta_training_step_flops(build_model: Callable[[], nn.Module],
                             loss_fn: Callable[[nn.Module, dict], torch.Tensor],
                             batch: dict) -> int:
    """`training_step_flops` of a fresh `build_model()` on the meta device, for
    `loss_fn(model, batch)` with the batch's tensors moved there: shapes only, so a model of
    any size is counted at once and without memory, beside the one being trained."""
    with torch.device("meta"):
        model = build_model()
    meta = {k: v.detach().to("meta").requires_grad_(v.requires_grad)
            if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return training_step_flops(model, lambda m: loss_fn(m, meta))


def mfu(flops_per_step: float, step_seconds: float, peak_flops: float) -> float:
    """Achieved FLOP/s over the device's peak FLOP/s (0..1)."""
    if step_seconds <= 0 or peak_flops <= 0:
        raise ValueError("step_seconds and peak_flops must be positive")
    return flops_per_step / step_seconds / peak_flops


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak FLOP/s of a GPU by its name (torch.cuda.get_device_name or
    nvidia-smi); None for a device not in the table."""
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in device_name),
                None)

"""The optimizer the engine is given: decay groups, and the fused kernel only on CUDA."""

from __future__ import annotations

import torch
from torch import nn

from orchestration.config import DeepSpeedConfig, OptimConfig, StageConfig
from orchestration.train.engine_setup import build_optimizer


def test_optimizer_groups_and_fused_only_on_cuda():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    stage = StageConfig(preset="any", optim=OptimConfig(lr=1e-3, weight_decay=0.1))
    optimizer = build_optimizer(model, stage, DeepSpeedConfig())
    assert isinstance(optimizer, torch.optim.AdamW)
    decay, no_decay = optimizer.param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([8, 4])]  # matrices only
    assert [p.shape for p in no_decay["params"]] == [torch.Size([8])] * 3  # bias, norm w, b
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    # CPU parameters: torch's default (foreach), not the CUDA-only fused kernel
    assert not decay["fused"]
    if torch.cuda.is_available():
        on_gpu = build_optimizer(model.cuda(), stage, DeepSpeedConfig())
        assert on_gpu.param_groups[0]["fused"] is True


def test_method_replaced_restores_own_and_inherited_methods():
    """ZeRO-3 construction wraps library init methods for the block only; afterwards each
    class is exactly as it was, whether it defined the method or inherited it."""
    from orchestration.train.engine_setup import _method_replaced

    class Base:
        def init(self):
            return "base"

    class Child(Base):
        pass

    class Own(Base):
        def init(self):
            return "own"

    original = Own.__dict__["init"]
    with _method_replaced(Child, "init", lambda self: "wrapped"), \
            _method_replaced(Own, "init", lambda self: "wrapped"):
        assert [Child().init(), Own().init(), Base().init()] == ["wrapped", "wrapped", "base"]
    assert "init" not in Child.__dict__
    assert Own.__dict__["init"] is original
    assert [Child().init(), Own().init()] == ["base", "own"]

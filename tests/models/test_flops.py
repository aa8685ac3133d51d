"""FLOP counting on models whose FLOPs are known exactly."""

import pytest
import torch
from torch import nn

from models.flops import meta_training_step_flops, mfu, peak_bf16_flops, training_step_flops

N, IN, OUT = 8, 16, 4


def test_linear_forward_backward_is_three_times_the_forward():
    # forward 2*N*IN*OUT (multiply + add per weight per sample); backward has two products of
    # the same size: the gradient of the input and the gradient of the weight
    model = nn.Linear(IN, OUT)
    x = torch.randn(N, IN, requires_grad=True)
    flops = training_step_flops(model, lambda m: m(x).sum())
    assert flops == 3 * 2 * N * IN * OUT
    assert model.weight.grad is None  # the count leaves no gradients behind


def test_input_without_gradient_skips_its_backward_product():
    # two layers, data input: the first layer needs no gradient for its input
    model = nn.Sequential(nn.Linear(IN, OUT, bias=False), nn.Linear(OUT, 2, bias=False))
    x = torch.randn(N, IN)
    flops = training_step_flops(model, lambda m: m(x).sum())
    assert flops == 2 * (2 * N * IN * OUT) + 3 * (2 * N * OUT * 2)


def test_mfu_is_achieved_over_peak():
    assert mfu(6e12, 2.0, 10e12) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        mfu(1.0, 0.0, 1.0)


def test_meta_count_equals_the_real_one_without_computing():
    batch = {"x": torch.randn(N, IN, requires_grad=True), "name": "not a tensor"}

    def loss(model, b):
        return model(b["x"]).sum()

    real = training_step_flops(nn.Linear(IN, OUT), lambda m: loss(m, batch))
    assert meta_training_step_flops(lambda: nn.Linear(IN, OUT), loss, batch) == real


def test_peak_table_prefers_the_specific_name():
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA L40S") == 362e12 and peak_bf16_flops("NVIDIA L4") == 121e12
    assert peak_bf16_flops("Tesla T4") is None

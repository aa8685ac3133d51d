"""Timestep respacing: sample with S <= T steps from a model trained on T steps.

Keeping a subset of timesteps and recomputing betas from the kept cumulative alphas gives a
shorter Markov chain with the same marginals q(x_t | x_0) at the kept steps (Nichol & Dhariwal
2021, section 4; DDIM uses the same subsequences).
"""

from __future__ import annotations

import torch


def spaced_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`steps` timesteps evenly spread over [0, num_timesteps - 1], always keeping both ends."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (steps - 1)
    return sorted({round(i * stride) for i in range(steps)})


def respaced_betas(alphas_cumprod: torch.Tensor, timesteps: list[int]) -> torch.Tensor:
    """Betas of the shorter chain whose cumulative products equal alphas_cumprod[timesteps]."""
    index = torch.as_tensor(timesteps, dtype=torch.long, device=alphas_cumprod.device)
    kept = alphas_cumprod[index]
    previous = torch.cat([kept.new_ones(1), kept[:-1]])
    return 1.0 - kept / previous

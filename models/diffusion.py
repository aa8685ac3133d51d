"""Gaussian diffusion maths in one class: schedule, q_sample, p_mean_variance, losses, samplers.

Names follow the papers (Ho et al. 2020; Nichol & Dhariwal 2021; Song et al. 2021 for DDIM) so
the code reads beside the equations. The class knows nothing about networks: it calls a
`denoiser(x_t, t, **model_kwargs)` and interprets the output according to the enums below.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from enum import StrEnum

import torch

from models.respace import respaced_betas, spaced_timesteps

Denoiser = Callable[..., torch.Tensor]


class ModelMeanType(StrEnum):
    EPSILON = "epsilon"  # predict the added noise
    START_X = "start_x"  # predict x_0 directly (DALL-E 2 prior, Ramesh et al. 2022, sec. 2.2)
    VELOCITY = "velocity"  # predict v = sqrt(abar) eps - sqrt(1 - abar) x_0


class ModelVarType(StrEnum):
    FIXED_SMALL = "fixed_small"  # posterior variance beta~_t
    FIXED_LARGE = "fixed_large"  # beta_t
    # interpolate log-variance between the two (Nichol & Dhariwal 2021; Zbinden 2022, eq. 3.7)
    LEARNED_RANGE = "learned_range"


class LossType(StrEnum):
    MSE = "mse"
    HYBRID = "hybrid"  # L_simple + lambda L_vlb, lambda = 1e-3 (Nichol & Dhariwal)


class Sampler(StrEnum):
    DDPM = "ddpm"
    DDIM = "ddim"


class Thresholding(StrEnum):
    NONE = "none"
    STATIC = "static"  # clamp predicted x_0 to [-1, 1]
    # Imagen (Saharia et al. 2022), used by Zbinden 2022, sec. 3.1.2 and 4.2: divide by the
    # per-sample percentile of |x_0| when above 1
    DYNAMIC = "dynamic"


def beta_schedule(name: str, num_timesteps: int) -> torch.Tensor:
    """Betas (float64) for a "linear" (Ho et al.) or "cosine" (Nichol & Dhariwal) schedule."""
    if name == "linear":
        scale = 1000.0 / num_timesteps  # keeps the end points sensible for any T
        return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64,
                              device="cpu")
    if name == "cosine":
        s = 0.008
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64, device="cpu") / num_timesteps
        alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {name!r}; use 'linear' or 'cosine'")


def _gather(values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """values[t] shaped to broadcast over x, in float32 on x's device."""
    out = values.to(device=t.device, dtype=torch.float32)[t]
    return out.reshape(-1, *([1] * (x.dim() - 1))).to(x.device)


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp logvar1) || N(mean2, exp logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, *, means, log_scales) -> torch.Tensor:
    """log p(x) of 8-bit data in [-1, 1] under a Gaussian integrated over each pixel's bin."""
    half_bin = 1.0 / 255.0
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (x - means + half_bin)
    lower = inv_std * (x - means - half_bin)
    # log_ndtr keeps the tails accurate where 1 - cdf would round to zero in float32.
    log_below_upper = torch.special.log_ndtr(upper)
    log_above_lower = torch.special.log_ndtr(-lower)
    bin_mass = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12)
    return torch.where(x < -0.999, log_below_upper,
                       torch.where(x > 0.999, log_above_lower, torch.log(bin_mass)))


def threshold_x0(x0: torch.Tensor, mode: Thresholding, percentile: float) -> torch.Tensor:
    mode = Thresholding(mode)
    if mode is Thresholding.STATIC:
        return x0.clamp(-1.0, 1.0)
    if mode is Thresholding.DYNAMIC:
        s = torch.quantile(x0.abs().flatten(1), percentile, dim=1).clamp(min=1.0)
        s = s.reshape(-1, *([1] * (x0.dim() - 1)))
        return x0.clamp(-s, s) / s
    return x0


def _randn(shape, *, generator: torch.Generator | None, device) -> torch.Tensor:
    # Draw on the generator's device and move: the same seed gives the same noise on CPU and GPU.
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def _with_cond_drop(model_kwargs: dict, batch: int, dropped: bool, device) -> dict:
    kwargs = dict(model_kwargs)
    kwargs["cond_drop"] = torch.full((batch,), dropped, dtype=torch.bool, device=device)
    return kwargs


def _doubled(model_kwargs: dict, batch: int) -> dict:
    """Repeat every per-sample tensor so one forward pass computes cond and uncond halves."""
    kwargs = {}
    for key, value in model_kwargs.items():
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch:
            kwargs[key] = torch.cat([value, value])
        else:
            kwargs[key] = value
    return kwargs


class GaussianDiffusion:
    """Forward process, reverse-process parameterisation, training losses and samplers."""

    def __init__(self, *, betas: torch.Tensor, model_mean_type: ModelMeanType,
                 model_var_type: ModelVarType, loss_type: LossType,
                 timestep_map: list[int] | None = None, snr_gamma: float | None = None):
        self.model_mean_type = ModelMeanType(model_mean_type)
        self.model_var_type = ModelVarType(model_var_type)
        self.loss_type = LossType(loss_type)
        learned_variance = self.model_var_type is ModelVarType.LEARNED_RANGE
        if (self.loss_type is LossType.HYBRID) != learned_variance:
            raise ValueError("the hybrid loss trains the variance: use LossType.HYBRID exactly "
                             "when model_var_type is LEARNED_RANGE")
        # Schedules live on the CPU in float64 (also under a meta/cuda default device);
        # `_gather` moves the few values a step needs.
        betas = torch.as_tensor(betas, dtype=torch.float64, device="cpu")
        if betas.dim() != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be positive (Hang et al. use 5), not {snr_gamma}")
        self.snr_gamma = snr_gamma
        self.betas = betas
        self.num_timesteps = len(betas)
        # Respaced chains call the network with the original timesteps it was trained on.
        self.timestep_map = torch.as_tensor(
            timestep_map if timestep_map is not None else range(self.num_timesteps),
            dtype=torch.long, device="cpu")

        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.alphas_cumprod_next = torch.cat([self.alphas_cumprod[1:], betas.new_zeros(1)])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (
            1.0 - self.alphas_cumprod)
        # beta~_0 = 0, so borrow beta~_1 for the log (only matters for learned variance).
        floor = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([floor.reshape(1), self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (
            1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (
            1.0 - self.alphas_cumprod)

    # ----- forward process -------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        return (_gather(self.sqrt_alphas_cumprod, t, x0) * x0
                + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior_mean_variance(self, x0, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (_gather(self.posterior_mean_coef1, t, x_t) * x0
                + _gather(self.posterior_mean_coef2, t, x_t) * x_t)
        return (mean, _gather(self.posterior_variance, t, x_t),
                _gather(self.posterior_log_variance_clipped, t, x_t))

    def _x0_from(self, mean_output, x_t, t):
        sqrt_ab = _gather(self.sqrt_alphas_cumprod, t, x_t)
        sqrt_1m_ab = _gather(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        if self.model_mean_type is ModelMeanType.EPSILON:
            return (x_t - sqrt_1m_ab * mean_output) / sqrt_ab
        if self.model_mean_type is ModelMeanType.VELOCITY:
            return sqrt_ab * x_t - sqrt_1m_ab * mean_output
        return mean_output

    def _eps_from_x0(self, x0, x_t, t):
        return ((x_t - _gather(self.sqrt_alphas_cumprod, t, x_t) * x0)
                / _gather(self.sqrt_one_minus_alphas_cumprod, t, x_t))

    # ----- reverse process -------------------------------------------------------------------
    def model_output(self, denoiser: Denoiser, x_t, t, *, model_kwargs: dict | None = None,
                     guidance_scale: float = 1.0) -> torch.Tensor:
        """Network output at (x_t, t), with classifier-free guidance on the mean channels.

        Scale 1 runs the model once with `model_kwargs` as given (conditional unless the caller
        set `cond_drop`); scale 0 runs it once with every `cond_drop` True; anything else runs
        the cond and uncond halves in one batch and mixes uncond + s (cond - uncond). Only the
        mean channels are mixed; a learned variance is taken from the conditional half.
        """
        kwargs = dict(model_kwargs or {})
        batch = x_t.shape[0]
        t_model = self.timestep_map.to(t.device)[t]
        if guidance_scale == 1.0:
            return denoiser(x_t, t_model, **kwargs).float()
        if guidance_scale == 0.0:
            kwargs = _with_cond_drop(kwargs, batch, True, x_t.device)
            return denoiser(x_t, t_model, **kwargs).float()
        kwargs = _doubled(kwargs, batch)
        kwargs["cond_drop"] = torch.arange(2 * batch, device=x_t.device) >= batch
        both = denoiser(torch.cat([x_t, x_t]), torch.cat([t_model, t_model]), **kwargs).float()
        cond, uncond = both[:batch], both[batch:]
        channels = x_t.shape[1]
        guided = uncond[:, :channels] + guidance_scale * (cond[:, :channels] - uncond[:, :channels])
        return torch.cat([guided, cond[:, channels:]], dim=1)

    def p_mean_variance_from_output(self, output, x_t, t, *,
                                    thresholding: Thresholding = Thresholding.NONE,
                                    dynamic_percentile: float = 0.995) -> dict:
        """Parameters of p(x_{t-1} | x_t) given the network output."""
        channels = x_t.shape[1]
        if self.model_var_type is ModelVarType.LEARNED_RANGE:
            if output.shape[1] != 2 * channels:
                raise ValueError(f"learned variance needs {2 * channels} output channels, "
                                 f"got {output.shape[1]}")
            mean_output, var_output = output[:, :channels], output[:, channels:]
            min_log = _gather(self.posterior_log_variance_clipped, t, x_t)
            max_log = _gather(torch.log(self.betas), t, x_t)
            frac = (var_output + 1.0) / 2.0  # network output in [-1, 1] -> [0, 1]
            log_variance = frac * max_log + (1.0 - frac) * min_log
        else:
            mean_output = output
            if self.model_var_type is ModelVarType.FIXED_LARGE:
                # beta_t, except beta~_1 at t = 0 for a better decoder likelihood (Ho et al.)
                large = torch.cat([self.posterior_variance[1:2], self.betas[1:]])
                log_variance = _gather(torch.log(large), t, x_t)
            else:
                log_variance = _gather(self.posterior_log_variance_clipped, t, x_t)
            log_variance = log_variance.expand_as(x_t)
        pred_x0 = threshold_x0(self._x0_from(mean_output, x_t, t), thresholding,
                               dynamic_percentile)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance,
                "pred_xstart": pred_x0, "pred_eps": self._eps_from_x0(pred_x0, x_t, t)}

    def p_mean_variance(self, denoiser: Denoiser, x_t, t, *, model_kwargs: dict | None = None,
                        guidance_scale: float = 1.0,
                        thresholding: Thresholding = Thresholding.NONE,
                        dynamic_percentile: float = 0.995) -> dict:
        output = self.model_output(denoiser, x_t, t, model_kwargs=model_kwargs,
                                   guidance_scale=guidance_scale)
        return self.p_mean_variance_from_output(output, x_t, t, thresholding=thresholding,
                                                dynamic_percentile=dynamic_percentile)

    # ----- training --------------------------------------------------------------------------
    def training_losses(self, denoiser: Denoiser, x0: torch.Tensor, t: torch.Tensor, *,
                        model_kwargs: dict | None = None,
                        noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-sample losses: "loss", "mse" and, with learned variance, "vb" (bits/dim)."""
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        t_model = self.timestep_map.to(t.device)[t]
        output = denoiser(x_t, t_model, **(model_kwargs or {})).float()
        channels = x0.shape[1]
        terms: dict[str, torch.Tensor] = {}
        if self.model_var_type is ModelVarType.LEARNED_RANGE:
            # Stop-gradient on the mean: the VB term trains only the variance
            # (Zbinden 2022, sec. 3.1.1, eq. 3.17).
            frozen = torch.cat([output[:, :channels].detach(), output[:, channels:]], dim=1)
            terms["vb"] = self._vb_bits_per_dim(frozen, x0, x_t, t)
        target = {
            ModelMeanType.EPSILON: noise,
            ModelMeanType.START_X: x0,
            ModelMeanType.VELOCITY: (_gather(self.sqrt_alphas_cumprod, t, x0) * noise
                                     - _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0),
        }[self.model_mean_type]
        terms["mse"] = _mean_flat((output[:, :channels] - target) ** 2)
        terms["loss"] = terms["mse"] * self._loss_weight(t, x0) if self.snr_gamma else terms["mse"]
        if self.loss_type is LossType.HYBRID:
            # L_vlb sums T per-step terms; lambda = 1/1000 on that sum gives this weight per step.
            terms["loss"] = terms["mse"] + terms["vb"] * (self.num_timesteps / 1000.0)
        return terms

    def _loss_weight(self, t, x0) -> torch.Tensor:
        """Min-SNR-gamma weighting (Hang et al. 2023, sec. 3.4): every parameterisation's MSE
        reweighted to min(SNR_t, gamma) times the x_0 error, so the low-noise steps, whose
        targets are easy, stop dominating the gradient."""
        abar = self.alphas_cumprod.to(t.device)[t].float()
        snr = abar / (1.0 - abar)
        clipped = snr.clamp(max=self.snr_gamma)
        return {ModelMeanType.EPSILON: clipped / snr, ModelMeanType.VELOCITY: clipped / (snr + 1),
                ModelMeanType.START_X: clipped}[self.model_mean_type]

    def _vb_bits_per_dim(self, output, x0, x_t, t) -> torch.Tensor:
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        model = self.p_mean_variance_from_output(output, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, model["mean"], model["log_variance"]))
        nll = -_mean_flat(discretized_gaussian_log_likelihood(
            x0, means=model["mean"], log_scales=0.5 * model["log_variance"]))
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    # ----- sampling --------------------------------------------------------------------------
    def respaced(self, steps: int | None) -> GaussianDiffusion:
        """The same process on `steps` evenly spaced timesteps (self when steps is None or T)."""
        if steps is None or steps == self.num_timesteps:
            return self
        kept = spaced_timesteps(self.num_timesteps, steps)
        return GaussianDiffusion(
            betas=respaced_betas(self.alphas_cumprod, kept),
            model_mean_type=self.model_mean_type, model_var_type=self.model_var_type,
            loss_type=self.loss_type, timestep_map=self.timestep_map[kept].tolist())

    def ddpm_step(self, denoiser, x_t, t, noise, **options) -> dict:
        out = self.p_mean_variance(denoiser, x_t, t, **options)
        nonzero = (t != 0).float().reshape(-1, *([1] * (x_t.dim() - 1)))
        out["sample"] = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return out

    def ddim_step(self, denoiser, x_t, t, noise, *, eta: float = 0.0, **options) -> dict:
        out = self.p_mean_variance(denoiser, x_t, t, **options)
        ab = _gather(self.alphas_cumprod, t, x_t)
        ab_prev = _gather(self.alphas_cumprod_prev, t, x_t)
        sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
        mean = (out["pred_xstart"] * ab_prev.sqrt()
                + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * out["pred_eps"])
        nonzero = (t != 0).float().reshape(-1, *([1] * (x_t.dim() - 1)))
        out["sample"] = mean + nonzero * sigma * noise
        return out

    @torch.no_grad()
    def sample(self, denoiser: Denoiser, shape, *, model_kwargs: dict | None = None,
               guidance_scale: float = 1.0, sampler: Sampler | str = Sampler.DDPM,
               steps: int | None = None, eta: float = 0.0,
               clip_denoised: Thresholding | str = Thresholding.NONE,
               dynamic_percentile: float = 0.995, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None, progress: bool = False,
               device: torch.device | str | None = None) -> torch.Tensor:
        """Draw samples from p(x_0); deterministic given `generator` (or `noise` and eta=0)."""
        sampler = Sampler(sampler)
        device = torch.device(device) if device is not None else _infer_device(
            denoiser, noise, model_kwargs)
        chain = self.respaced(steps)
        x = noise.to(device) if noise is not None else _randn(
            shape, generator=generator, device=device)
        options = {"model_kwargs": model_kwargs, "guidance_scale": guidance_scale,
                   "thresholding": Thresholding(clip_denoised),
                   "dynamic_percentile": dynamic_percentile}
        for i in reversed(range(chain.num_timesteps)):
            t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
            # One draw per step for both samplers, so DDIM eta=1 and DDPM share noise.
            step_noise = _randn(x.shape, generator=generator, device=device)
            if sampler is Sampler.DDIM:
                x = chain.ddim_step(denoiser, x, t, step_noise, eta=eta, **options)["sample"]
            else:
                x = chain.ddpm_step(denoiser, x, t, step_noise, **options)["sample"]
            if progress:
                print(f"\rsampling step {chain.num_timesteps - i}/{chain.num_timesteps}",
                      end="", file=sys.stderr)
        if progress:
            print(file=sys.stderr)
        return x

    @torch.no_grad()
    def ddim_invert(self, denoiser: Denoiser, x0: torch.Tensor, *,
                    model_kwargs: dict | None = None, steps: int | None = None,
                    guidance_scale: float = 1.0) -> torch.Tensor:
        """Run DDIM (eta=0) forwards: x_0 -> the x_T from which `sample(..., sampler="ddim",
        eta=0, steps=steps)` approximately reconstructs x_0 (DALL-E 2 variations and text diffs:
        Ramesh et al. 2022, sec. 3.1 and 3.3)."""
        chain = self.respaced(steps)
        x = x0
        for i in range(chain.num_timesteps - 1):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            out = chain.p_mean_variance(denoiser, x, t, model_kwargs=model_kwargs,
                                        guidance_scale=guidance_scale)
            ab_next = _gather(chain.alphas_cumprod, t + 1, x)
            x = out["pred_xstart"] * ab_next.sqrt() + (1 - ab_next).sqrt() * out["pred_eps"]
        return x


def _infer_device(denoiser, noise, model_kwargs) -> torch.device:
    if noise is not None:
        return noise.device
    for value in (model_kwargs or {}).values():
        if torch.is_tensor(value):
            return value.device
    if isinstance(denoiser, torch.nn.Module):
        for param in denoiser.parameters():
            return param.device
    return torch.device("cpu")

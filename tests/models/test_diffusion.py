import pytest
import torch

from models.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    beta_schedule,
    threshold_x0,
)
from models.respace import spaced_timesteps


def make_diffusion(num_timesteps=50, mean_type=ModelMeanType.EPSILON,
                   var_type=ModelVarType.FIXED_SMALL, schedule="cosine"):
    loss = LossType.HYBRID if var_type is ModelVarType.LEARNED_RANGE else LossType.MSE
    return GaussianDiffusion(betas=beta_schedule(schedule, num_timesteps),
                             model_mean_type=mean_type, model_var_type=var_type, loss_type=loss)


class ConditionalToy(torch.nn.Module):
    """Small nonlinear denoiser whose output depends on a condition and on cond_drop."""

    def __init__(self, channels=2, out_channels=None):
        super().__init__()
        self.net = torch.nn.Linear(channels + 1, out_channels or channels)
        self.null = torch.nn.Parameter(torch.tensor([-0.7]))

    def forward(self, x, t, *, cond, cond_drop=None):
        c = cond if cond_drop is None else torch.where(cond_drop[:, None], self.null, cond)
        feats = torch.cat([x * torch.cos(t.float()[:, None] / 7), c], dim=1)
        return torch.tanh(self.net(feats))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_beta_schedules(schedule):
    betas = beta_schedule(schedule, 300)
    assert betas.dtype == torch.float64 and betas.shape == (300,)
    assert bool((betas > 0).all() and (betas < 1).all())
    alpha_bar = torch.cumprod(1 - betas, 0)
    assert alpha_bar[0] > 0.99 and alpha_bar[-1] < 0.01


def test_q_sample_statistics_match_the_schedule():
    diffusion = make_diffusion(100)
    x0 = torch.full((20000, 1), 0.8)
    for step in (0, 30, 99):
        t = torch.full((len(x0),), step)
        x_t = diffusion.q_sample(x0, t, torch.randn_like(x0))
        ab = diffusion.alphas_cumprod[step].item()
        assert x_t.mean().item() == pytest.approx(0.8 * ab ** 0.5, abs=0.02)
        assert x_t.std().item() == pytest.approx((1 - ab) ** 0.5, abs=0.02)


def test_respacing_keeps_marginals():
    diffusion = make_diffusion(100)
    short = diffusion.respaced(10)
    kept = spaced_timesteps(100, 10)
    assert kept[0] == 0 and kept[-1] == 99 and short.num_timesteps == 10
    torch.testing.assert_close(short.alphas_cumprod, diffusion.alphas_cumprod[kept])
    assert short.timestep_map.tolist() == kept


def test_guidance_scale_one_is_conditional_and_zero_unconditional_exactly():
    diffusion = make_diffusion()
    model = ConditionalToy()
    x, cond = torch.randn(4, 2), torch.randn(4, 1)
    t = torch.tensor([0, 5, 17, 49])
    conditional = model(x, t, cond=cond, cond_drop=torch.zeros(4, dtype=torch.bool))
    unconditional = model(x, t, cond=cond, cond_drop=torch.ones(4, dtype=torch.bool))
    kwargs = {"cond": cond}
    assert torch.equal(diffusion.model_output(model, x, t, model_kwargs=kwargs,
                                              guidance_scale=1.0), conditional)
    assert torch.equal(diffusion.model_output(model, x, t, model_kwargs=kwargs,
                                              guidance_scale=0.0), unconditional)
    guided = diffusion.model_output(model, x, t, model_kwargs=kwargs, guidance_scale=3.0)
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional))

    def sample(scale, drop):
        return diffusion.sample(model, (4, 2), model_kwargs={"cond": cond, "cond_drop": drop},
                                guidance_scale=scale, steps=10,
                                generator=torch.Generator().manual_seed(1))

    no, yes = torch.zeros(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool)
    assert torch.equal(sample(1.0, None), sample(1.0, no))
    assert torch.equal(sample(3.0, no), sample(3.0, yes))  # guidance overrides cond_drop
    assert torch.equal(sample(0.0, no), sample(1.0, yes))


def test_guidance_mixes_mean_channels_only():
    diffusion = make_diffusion(var_type=ModelVarType.LEARNED_RANGE)
    model = ConditionalToy(out_channels=4)
    x, cond, t = torch.randn(3, 2), torch.randn(3, 1), torch.tensor([1, 2, 3])
    out = diffusion.model_output(model, x, t, model_kwargs={"cond": cond}, guidance_scale=4.0)
    conditional = model(x, t, cond=cond, cond_drop=torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(out[:, 2:], conditional[:, 2:])


def test_samplers_are_deterministic_given_a_generator():
    diffusion = make_diffusion()
    model = ConditionalToy()
    kwargs = {"cond": torch.randn(6, 1)}
    for sampler, eta in (("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0)):
        a, b = (diffusion.sample(model, (6, 2), model_kwargs=kwargs, sampler=sampler, eta=eta,
                                 steps=12, generator=torch.Generator().manual_seed(7))
                for _ in range(2))
        assert torch.equal(a, b)
    # eta = 0 depends only on x_T, not on the generator's later draws.
    noise = torch.randn(6, 2)
    a = diffusion.sample(model, (6, 2), model_kwargs=kwargs, sampler="ddim", noise=noise,
                         generator=torch.Generator().manual_seed(1))
    b = diffusion.sample(model, (6, 2), model_kwargs=kwargs, sampler="ddim", noise=noise,
                         generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_ddim_eta_one_with_all_steps_is_ddpm():
    """With sigma_t^2 = posterior variance, DDIM's update is the DDPM posterior step."""
    diffusion = make_diffusion(40)
    model = ConditionalToy()
    kwargs = {"cond": torch.randn(8, 1)}
    ddpm = diffusion.sample(model, (8, 2), model_kwargs=kwargs, sampler="ddpm",
                            generator=torch.Generator().manual_seed(3))
    ddim = diffusion.sample(model, (8, 2), model_kwargs=kwargs, sampler="ddim", eta=1.0,
                            generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ddim, ddpm, atol=1e-4, rtol=1e-4)


class GaussianOracle(torch.nn.Module):
    """Exact E[x_0 | x_t] for data ~ N(0, sigma^2 I): the perfect START_X denoiser."""

    def __init__(self, alphas_cumprod, sigma):
        super().__init__()
        self.alphas_cumprod, self.sigma = alphas_cumprod.float(), sigma

    def forward(self, x, t):
        ab = self.alphas_cumprod[t][:, None]
        return ab.sqrt() * self.sigma**2 / (ab * self.sigma**2 + 1 - ab) * x


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddim", None), ("ddim", 25)])
def test_samplers_with_a_perfect_denoiser_reproduce_the_data_distribution(sampler, steps):
    sigma = 0.5
    diffusion = make_diffusion(100, mean_type=ModelMeanType.START_X)
    oracle = GaussianOracle(diffusion.alphas_cumprod, sigma)
    samples = diffusion.sample(oracle, (4000, 2), sampler=sampler, steps=steps,
                               generator=torch.Generator().manual_seed(0))
    assert samples.mean().abs().item() < 0.03
    assert samples.std().item() == pytest.approx(sigma, rel=0.08)


def test_ddim_inversion_round_trips_with_a_perfect_denoiser():
    # Inversion reuses eps(x_t) for the step to t+1, so the error shrinks like 1/steps.
    diffusion = make_diffusion(1000, mean_type=ModelMeanType.START_X)
    oracle = GaussianOracle(diffusion.alphas_cumprod, 0.5)
    x0 = 0.5 * torch.randn(16, 2)
    x_t = diffusion.ddim_invert(oracle, x0, steps=250)
    assert x_t.std().item() == pytest.approx(1.0, abs=0.3)  # looks like noise
    recon = diffusion.sample(oracle, (16, 2), sampler="ddim", steps=250, noise=x_t)
    torch.testing.assert_close(recon, x0, atol=0.03, rtol=0.03)


def test_dynamic_thresholding_bounds_predictions_and_samples():
    x0 = torch.randn(4, 3, 8, 8) * 3
    out = threshold_x0(x0, "dynamic", 0.995)
    assert out.abs().max() <= 1.0 + 1e-6
    small = torch.rand(2, 3, 8, 8) * 0.5
    assert torch.equal(threshold_x0(small, "dynamic", 0.995), small)  # s < 1: untouched
    diffusion = make_diffusion(20)

    def wild(x, t):
        return 5 * torch.randn_like(x)

    for sampler in ("ddpm", "ddim"):
        images = diffusion.sample(wild, (2, 3, 8, 8), sampler=sampler, clip_denoised="dynamic",
                                  guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
        assert images.abs().max() <= 1.0 + 1e-5


@pytest.mark.parametrize("mean_type", list(ModelMeanType))
def test_training_targets_are_consistent_with_the_x0_reconstruction(mean_type):
    diffusion = make_diffusion(mean_type=mean_type)
    x0, noise = torch.randn(5, 2), torch.randn(5, 2)
    t = torch.tensor([0, 3, 10, 30, 49])
    x_t = diffusion.q_sample(x0, t, noise)
    ab = diffusion.alphas_cumprod[t].float()[:, None]
    target = {ModelMeanType.EPSILON: noise, ModelMeanType.START_X: x0,
              ModelMeanType.VELOCITY: ab.sqrt() * noise - (1 - ab).sqrt() * x0}[mean_type]

    def perfect(x, timestep):
        return target

    losses = diffusion.training_losses(perfect, x0, t, noise=noise)
    assert losses["loss"].abs().max() < 1e-10
    out = diffusion.p_mean_variance(perfect, x_t, t)
    torch.testing.assert_close(out["pred_xstart"], x0, atol=1e-4, rtol=1e-4)


def test_hybrid_loss_has_vb_term_and_trains_variance():
    diffusion = make_diffusion(var_type=ModelVarType.LEARNED_RANGE)
    model = ConditionalToy(channels=2, out_channels=4)
    x0 = torch.rand(8, 2) * 2 - 1
    t = torch.arange(8) * 6
    losses = diffusion.training_losses(model, x0, t, model_kwargs={"cond": torch.randn(8, 1)})
    assert set(losses) == {"loss", "mse", "vb"}
    assert torch.isfinite(losses["loss"]).all()
    losses["vb"].sum().backward()
    assert model.net.weight.grad[2:].abs().sum() > 0  # variance rows get VB gradient
    assert model.net.weight.grad[:2].abs().sum() == 0  # mean rows do not (stop-gradient)
    with pytest.raises(ValueError):
        GaussianDiffusion(betas=beta_schedule("cosine", 10), model_mean_type="epsilon",
                          model_var_type="learned_range", loss_type="mse")


def test_min_snr_weighting_gives_every_parameterisation_the_same_x0_loss():
    """With min-SNR-gamma, one x_0 error costs min(SNR_t, gamma) * |x0_hat - x0|^2 whichever
    quantity the network predicts (Hang et al. 2023, sec. 3.4)."""
    x0, noise = torch.randn(5, 2), torch.randn(5, 2)
    x0_hat = x0 + 0.3 * torch.randn(5, 2)
    t = torch.tensor([0, 3, 10, 30, 49])
    losses = {}
    for mean_type in ModelMeanType:
        diffusion = GaussianDiffusion(betas=beta_schedule("cosine", 50), model_mean_type=mean_type,
                                      model_var_type=ModelVarType.FIXED_SMALL,
                                      loss_type=LossType.MSE, snr_gamma=5.0)
        x_t = diffusion.q_sample(x0, t, noise)
        ab = diffusion.alphas_cumprod[t].float()[:, None]
        eps_hat = (x_t - ab.sqrt() * x0_hat) / (1 - ab).sqrt()
        output = {ModelMeanType.EPSILON: eps_hat, ModelMeanType.START_X: x0_hat,
                  ModelMeanType.VELOCITY: ab.sqrt() * eps_hat - (1 - ab).sqrt() * x0_hat}[mean_type]
        losses[mean_type] = diffusion.training_losses(lambda x, s, out=output: out, x0, t,
                                                      noise=noise)["loss"]
    ab = make_diffusion().alphas_cumprod[t].float()
    expected = (ab / (1 - ab)).clamp(max=5.0) * ((x0_hat - x0) ** 2).mean(dim=1)
    for loss in losses.values():
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="snr_gamma must be positive"):
        GaussianDiffusion(betas=beta_schedule("cosine", 50), model_mean_type="epsilon",
                          model_var_type="fixed_small", loss_type="mse", snr_gamma=0)

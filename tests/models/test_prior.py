import pytest
import torch

from models.prior import UnCLIPPrior, build_prior


def fixed_batch(n=4, dim=32, context=16, width=64):
    text = torch.randn(n, dim)
    image = torch.nn.functional.normalize(text + 0.5 * torch.randn(n, dim), dim=-1)
    return text, image, torch.randn(n, context, width)


def test_transformer_prior_shapes_and_bf16(tiny_prior):
    prior = tiny_prior()
    text, image, tokens = fixed_batch()
    assert prior.loss(text_emb=text, image_emb=image, text_tokens=tokens)["loss"].dim() == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = prior.loss(text_emb=text, image_emb=image, text_tokens=tokens)
    assert torch.isfinite(losses["loss"]) and losses["loss"].dtype == torch.float32
    out = prior.sample(text_emb=text, text_tokens=tokens, steps=5, guidance_scale=2.0,
                       generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 32) and out.dtype == torch.float32


@pytest.mark.parametrize("kind", ["diffusion_transformer", "mlp_translator"])
def test_prior_overfits_a_fixed_batch(tiny_prior, kind):
    prior = tiny_prior(kind=kind, cond_drop_prob=0.0, width=64, layers=2)
    text, image, tokens = fixed_batch()
    t = torch.tensor([1, 5, 10, 19])
    noise = torch.randn(4, 32)
    optimizer = torch.optim.Adam(prior.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = prior.loss(text_emb=text, image_emb=image, text_tokens=tokens, t=t,
                          noise=noise)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, losses[::25]


def test_best_of_n_picks_the_candidate_closest_to_the_text(tiny_prior):
    prior = tiny_prior()
    text, _, tokens = fixed_batch(n=3)
    best = prior.sample(text_emb=text, num_candidates=4, steps=4,
                        generator=torch.Generator().manual_seed(5))
    # Same seed, one candidate per text drawn in the same order: recover all four candidates.
    generator = torch.Generator().manual_seed(5)
    candidates = prior.sample(text_emb=text.repeat_interleave(4, 0), num_candidates=1, steps=4,
                              generator=generator).reshape(3, 4, -1)
    scores = (candidates * text[:, None]).sum(-1)
    torch.testing.assert_close(best, candidates[torch.arange(3), scores.argmax(1)])


def test_normalisation_is_fitted_saved_and_inverted(tiny_prior):
    prior = tiny_prior(normalisation="standardise")
    sample = torch.randn(500, 32) * 3 + 1
    prior.set_normalisation(sample)
    normalised = prior.normalise(sample)
    assert normalised.mean().abs() < 1e-4 and (normalised.std(0) - 1).abs().max() < 1e-3
    torch.testing.assert_close(prior.unnormalise(normalised), sample)
    rebuilt = build_prior(prior.config)
    rebuilt.load_state_dict(prior.state_dict())
    torch.testing.assert_close(rebuilt.emb_std, prior.emb_std)


def test_config_round_trips_and_rejects_unknown_keys(tiny_prior):
    prior = tiny_prior(kind="mlp_translator")
    rebuilt = build_prior(prior.config)
    assert isinstance(rebuilt, UnCLIPPrior) and rebuilt.config == prior.config
    with pytest.raises(ValueError, match="valid keys"):
        build_prior({**prior.config, "depth": 3})


def test_mlp_translator_sample_is_deterministic(tiny_prior):
    prior = tiny_prior(kind="mlp_translator", dropout=0.5).train()
    text = torch.randn(3, 32)
    assert torch.equal(prior.sample(text_emb=text), prior.sample(text_emb=text))
    assert prior.training  # sample restores the mode it found


@pytest.mark.parametrize(("with_tokens", "dropped"), [
    (False, [False, True, False, False, True]), (True, [False, True, False, False, True]),
    (True, [False] * 5), (True, [True] * 5)])
def test_shortcuts_give_the_full_sequence_result_and_gradients(tiny_prior, with_tokens,
                                                               dropped):
    """The prior's exact shortcuts: the last block computes only the query position, and rows
    that see only null text tokens (no tokens given, or their condition dropped) run the
    null-token prefix once for all of them. Outputs and gradients equal those of running
    every position of every sample's full sequence."""
    prior = tiny_prior(width=32, layers=3, heads=2)
    network = prior.network
    x_t, text = torch.randn(5, 32), torch.randn(5, 32)
    text_tokens = torch.randn(5, 16, 64) if with_tokens else None
    t = torch.tensor([0, 3, 7, 12, 19])
    cond_drop = torch.tensor(dropped)

    def full_sequence():  # the long way: every position, every sample
        tokens = network._token_inputs(text_tokens, cond_drop, 5, torch.float32)
        text_in = torch.where(cond_drop[:, None, None], network.null_text_emb,
                              network.text_emb_in(text)[:, None])
        from models.timestep_embedding import sinusoidal_embedding
        time = network.time_mlp(sinusoidal_embedding(t, network.width))[:, None]
        tail = torch.cat([text_in, time, network.noised_emb_in(x_t)[:, None],
                          network.query.expand(5, 1, -1)], dim=1)
        x = torch.cat([tokens, tail + network.position[network.context_length:]], dim=1)
        for block in network.blocks:
            x, _ = block(x)
        return network.out(network.ln_out(x[:, -1]))

    def grads(fn):
        network.zero_grad()
        out = fn()
        out.pow(2).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in network.named_parameters()
                              if p.grad is not None}

    shared_out, shared_grads = grads(lambda: network(x_t, t, text_emb=text,
                                                     text_tokens=text_tokens,
                                                     cond_drop=cond_drop))
    full_out, full_grads = grads(full_sequence)
    torch.testing.assert_close(shared_out, full_out, rtol=1e-5, atol=1e-5)
    # a layer the shortcut never runs (text tokens when every row is dropped) has no
    # gradient; the long way gives it an all-zero one
    assert [n for n in full_grads if n not in shared_grads and full_grads[n].any()] == []
    assert set(shared_grads) <= set(full_grads)
    if not with_tokens or any(dropped):
        assert "null_text_tokens" in shared_grads  # a shared prefix still learns
    for name in shared_grads:
        torch.testing.assert_close(shared_grads[name], full_grads[name], rtol=1e-4, atol=1e-5,
                                   msg=name)

import subprocess
import sys

import torch

from models.unclip_pipeline import UnCLIPPipeline, images_to_grid, slerp

SAMPLING = {"prior_steps": 4, "steps": 4, "decoder_guidance": 2.0, "num_candidates": 2}


def make_pipeline(tiny_clip, tiny_prior, tiny_decoder, **decoder_overrides):
    return UnCLIPPipeline(clip=tiny_clip(), prior=tiny_prior(), decoder=tiny_decoder(
        **decoder_overrides), context_length=16, sampling=SAMPLING).eval()


def test_generate_shapes_and_seed_determinism(tiny_clip, tiny_prior, tiny_decoder):
    pipeline = make_pipeline(tiny_clip, tiny_prior, tiny_decoder, text_width=64)
    images = pipeline.generate(["a red circle", "a blue square"], num_images_per_prompt=2,
                               seed=3)
    assert images.shape == (4, 16, 16, 3) and images.dtype == torch.uint8
    assert torch.equal(images, pipeline.generate(["a red circle", "a blue square"],
                                                 num_images_per_prompt=2, seed=3))
    assert not torch.equal(images, pipeline.generate(["a red circle", "a blue square"],
                                                     num_images_per_prompt=2, seed=4))


def test_save_load_gives_identical_images(tmp_path, tiny_clip, tiny_prior, tiny_decoder):
    pipeline = make_pipeline(tiny_clip, tiny_prior, tiny_decoder)
    for param in pipeline.decoder.parameters():  # make the untrained decoder non-trivial
        torch.nn.init.normal_(param, std=0.05)
    pipeline.prior.set_normalisation(torch.randn(64, 32))
    pipeline.save(tmp_path)
    loaded = UnCLIPPipeline.load(tmp_path)
    assert (tmp_path / "config.json").exists()
    for kwargs in ({}, {"sampler": "ddpm", "decoder_guidance": 1.0}):
        assert torch.equal(pipeline.generate(["a green star"], seed=11, **kwargs),
                           loaded.generate(["a green star"], seed=11, **kwargs))


def test_without_prior_the_decoder_gets_the_given_or_the_text_embedding(
        tiny_clip, tiny_prior, tiny_decoder, monkeypatch):
    """The ablations (Zbinden 2022, table 5.1) are the full pipeline with the prior's output
    replaced: by the given image embedding, or by the prompt's own text embedding."""
    pipeline = make_pipeline(tiny_clip, tiny_prior, tiny_decoder, text_width=64)
    for param in pipeline.decoder.parameters():  # untrained outputs are zero: make them depend
        torch.nn.init.normal_(param, std=0.05)  # on the embedding
    prompts = ["a red circle", "a blue square"]
    given = torch.randn(2, 32)
    text_emb, _ = pipeline.encode_text(prompts)
    for replacement, kwargs in ((given, {"image_emb": given}), (text_emb, {})):
        monkeypatch.setattr(pipeline.prior, "sample",
                            lambda replacement=replacement, **_: replacement.repeat_interleave(
                                2, dim=0))
        assert torch.equal(pipeline.generate(prompts, num_images_per_prompt=2, seed=5),
                           pipeline.generate_without_prior(prompts, num_images_per_prompt=2,
                                                            seed=5, **kwargs))
    assert not torch.equal(pipeline.generate_without_prior(prompts, image_emb=given, seed=5),
                           pipeline.generate_without_prior(prompts, seed=5))


def test_variations_interpolation_and_text_diff(tiny_clip, tiny_prior, tiny_decoder):
    pipeline = make_pipeline(tiny_clip, tiny_prior, tiny_decoder)
    emb_a, emb_b = torch.randn(32), torch.randn(32)
    variations = pipeline.variations(emb_a, num_variations=3, eta=1.0)
    assert variations.shape == (3, 16, 16, 3)
    frames = pipeline.interpolate(emb_a, emb_b, num=4)
    assert frames.shape == (4, 16, 16, 3)
    source = torch.rand(1, 3, 16, 16) * 2 - 1
    edits = pipeline.text_diff(emb_a, "a red circle", "a blue square", ratios=(0.0, 0.5),
                               images=source)
    assert edits.shape == (2, 16, 16, 3)
    grid = images_to_grid(torch.cat([variations, frames]), nrow=4)
    assert grid.size == (64, 32)


def test_slerp_endpoints_and_norm():
    a, b = torch.randn(2, 8), torch.randn(2, 8)
    torch.testing.assert_close(slerp(a, b, 0.0), torch.nn.functional.normalize(a, dim=-1))
    torch.testing.assert_close(slerp(a, b, 1.0), torch.nn.functional.normalize(b, dim=-1))
    mid = slerp(a[:1], b[:1], torch.linspace(0, 1, 5))
    assert mid.shape == (5, 8)
    torch.testing.assert_close(mid.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(slerp(a, a, 0.3), torch.nn.functional.normalize(a, dim=-1))


def test_importing_models_does_not_import_orchestration_dependencies():
    code = ("import sys, models; heavy = [m for m in sys.modules if m.split('.')[0] in "
            "('ray', 'mlflow', 'boto3', 'deepspeed', 'orchestration', 'data_pipelines')]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

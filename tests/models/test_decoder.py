import pytest
import torch

from models.decoder import build_decoder
from models.decoder_unet import DecoderUNet


def test_unet_shapes_learned_variance_and_super_resolution_seam():
    unet = DecoderUNet(image_size=16, out_channels=6, base_channels=16, channel_mults=(1, 2),
                       num_res_blocks=1, attention_resolutions=(8,), head_channels=16,
                       clip_embed_dim=32, text_width=64,
                       low_res_channels=3, time_conditioning="timestep_plus_image_emb")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 7])
    out = unet(x, t, image_emb=torch.randn(2, 32), text_tokens=torch.randn(2, 16, 64),
               low_res=torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 6, 16, 16)


def test_cond_drop_switches_to_null_conditioning(tiny_decoder):
    unet = tiny_decoder().unet
    for param in unet.parameters():  # zero-initialised output layers hide any difference
        torch.nn.init.normal_(param, std=0.05)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 7])
    drop = torch.ones(2, dtype=torch.bool)
    a = unet(x, t, image_emb=torch.randn(2, 32), cond_drop=drop)
    b = unet(x, t, image_emb=torch.randn(2, 32), cond_drop=drop)
    c = unet(x, t, image_emb=torch.randn(2, 32))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("variant", [{}, {"var_type": "learned_range"},
                                     {"text_width": 64, "cond_drop_mode": "separate"}])
def test_decoder_loss_sample_and_bf16(tiny_decoder, variant):
    decoder = tiny_decoder(**variant)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    emb = torch.randn(2, 32)
    tokens = torch.randn(2, 16, 64) if "text_width" in variant else None
    losses = decoder.loss(images=images, image_emb=emb, text_tokens=tokens)
    assert ("vb" in losses) == ("var_type" in variant)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = decoder.loss(images=images, image_emb=emb, text_tokens=tokens)
    assert torch.isfinite(losses["loss"]) and losses["loss"].dtype == torch.float32
    out = decoder.sample(image_emb=emb, text_tokens=tokens, guidance_scale=3.0, steps=4,
                         sampler="ddim", thresholding="dynamic",
                         generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 16, 16) and out.abs().max() <= 1.0


def test_decoder_overfits_a_fixed_batch(tiny_decoder):
    decoder = tiny_decoder(cond_drop_prob=0.0, image_size=8, attention_resolutions=(4,))
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    emb, noise = torch.randn(4, 32), torch.randn(4, 3, 8, 8)
    t = torch.tensor([2, 6, 11, 15])
    optimizer = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        loss = decoder.loss(images=images, image_emb=emb, t=t, noise=noise)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, losses[::20]


def test_config_round_trip(tiny_decoder):
    decoder = tiny_decoder(var_type="learned_range", cond_drop_mode="separate")
    rebuilt = build_decoder(decoder.config)
    assert rebuilt.config == decoder.config
    rebuilt.load_state_dict(decoder.state_dict())
    with pytest.raises(ValueError, match="image_size"):
        build_decoder({**decoder.config, "image_size": 15})

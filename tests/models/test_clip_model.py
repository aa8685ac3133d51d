import math

import open_clip
import pytest
import torch

from models.clip_model import (
    MAX_LOGIT_SCALE,
    ClipContrastiveLoss,
    build_clip,
    clamp_logit_scale_,
    encode_text_with_tokens,
    tokenize,
)

CONTEXT = 16  # matches conftest


def test_presets_are_registered_with_open_clip():
    build_clip("shapes-tiny")
    assert {"shapes-tiny", "shapes-paper"} <= set(open_clip.list_models())


def test_standard_open_clip_names_build_offline_with_random_weights():
    with torch.device("meta"):
        model = build_clip("RN50", context_length=33)
    assert model.context_length == 33


def test_unknown_override_names_the_valid_keys():
    with pytest.raises(ValueError, match="text_layers"):
        build_clip("shapes-tiny", text_layer=3)


def test_tokenize_pads_to_context_length():
    tokens = tokenize(["a red circle", "a large blue square"], context_length=CONTEXT)
    assert tokens.shape == (2, CONTEXT) and tokens.dtype == torch.long
    assert (tokens[:, 0] == tokens[0, 0]).all()  # start-of-text token


def test_text_outputs_match_open_clip_and_expose_tokens(tiny_clip):
    model = tiny_clip().eval()
    tokens = tokenize(["a red circle", "two green triangles"], context_length=CONTEXT)
    embedding, token_encodings = encode_text_with_tokens(model, tokens)
    assert embedding.shape == (2, 32)
    assert token_encodings.shape == (2, CONTEXT, 64)
    torch.testing.assert_close(embedding, model.encode_text(tokens))
    assert model.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, 32)


def test_bf16_autocast_forward(tiny_clip):
    model = tiny_clip()
    tokens = tokenize(["a red circle"] * 2, context_length=CONTEXT)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embedding, _ = encode_text_with_tokens(model, tokens)
        image = model.encode_image(torch.randn(2, 3, 32, 32))
        loss = ClipContrastiveLoss()(image_features=image, text_features=embedding,
                                     logit_scale=model.logit_scale)
    assert torch.isfinite(loss) and loss.dtype == torch.float32


def test_temperature_init_and_clamp(tiny_clip):
    model = tiny_clip()
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    clamp_logit_scale_(model)
    assert model.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE)


def test_contrastive_loss_overfits_a_fixed_batch(tiny_clip):
    model = tiny_clip()
    captions = [f"a {c} {s}" for c in ("red", "blue") for s in ("circle", "square", "star",
                                                                 "ellipse")]
    tokens = tokenize(captions, context_length=CONTEXT)
    images = torch.randn(len(captions), 3, 32, 32)
    loss_fn = ClipContrastiveLoss(rank=0, world_size=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(60):
        text, _ = encode_text_with_tokens(model, tokens)
        loss = loss_fn(image_features=model.encode_image(images), text_features=text,
                       logit_scale=model.logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        clamp_logit_scale_(model)
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, losses[::10]

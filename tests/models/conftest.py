"""Tiny model builders shared by the models tests (fast on two CPU cores)."""

import pytest
import torch

from models.clip_model import build_clip
from models.decoder import DecoderConfig, UnCLIPDecoder
from models.prior import PriorConfig, UnCLIPPrior

CONTEXT = 16


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def _tiny_clip():
    return build_clip("shapes-tiny", context_length=CONTEXT, text_layers=1, embed_dim=32)


def _tiny_prior(**overrides):
    values = dict(clip_embed_dim=32, text_width=64, context_length=CONTEXT, width=32, layers=1,
                  heads=2, num_timesteps=20, cond_drop_prob=0.1)
    values.update(overrides)
    return UnCLIPPrior(config=PriorConfig(**values))


def _tiny_decoder(**overrides):
    values = dict(image_size=16, clip_embed_dim=32, base_channels=16, channel_mults=(1, 2),
                  num_res_blocks=1, attention_resolutions=(8,), head_channels=16,
                  num_timesteps=20)
    values.update(overrides)
    return UnCLIPDecoder(config=DecoderConfig(**values))


# Builders as fixtures: tests/models has no __init__.py (a package named "models" there would
# shadow the real one), so tests receive them instead of importing this file.
@pytest.fixture
def tiny_clip():
    return _tiny_clip


@pytest.fixture
def tiny_prior():
    return _tiny_prior


@pytest.fixture
def tiny_decoder():
    return _tiny_decoder

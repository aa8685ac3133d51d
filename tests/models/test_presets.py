import pytest

from models.presets import (
    build_decoder_preset,
    build_prior_preset,
    list_presets,
)

# Luo 2023, table 4.3 (parameter counts)
PAPER_PARAMS = {"clip": 4.3e6, "prior": 4.3e6, "decoder": 10e6}


def test_list_presets_covers_every_component_with_counts():
    rows = list_presets()
    names = {(row["component"], row["name"]) for row in rows}
    assert {("clip", "shapes-tiny"), ("clip", "ViT-B-32"), ("prior", "mlp-translator"),
            ("decoder", "cluster-64")} <= names
    assert all(isinstance(row["params"], int) and row["params"] > 0 for row in rows)


def test_shapes_paper_parameter_counts_match_luo_2023_table_4_3():
    counts = {row["component"]: row["params"] for row in list_presets()
              if row["name"] == "shapes-paper"}
    for component, expected in PAPER_PARAMS.items():
        assert abs(counts[component] - expected) / expected < 0.15, (component, counts)


def test_unknown_override_raises_with_valid_keys():
    with pytest.raises(ValueError, match="num_layers.*valid keys"):
        build_prior_preset("shapes-tiny", clip_embed_dim=32, text_width=64, context_length=16,
                           num_layers=3)
    with pytest.raises(ValueError, match="unknown decoder preset"):
        build_decoder_preset("huge", clip_embed_dim=32)


def test_overrides_apply():
    prior = build_prior_preset("shapes-tiny", clip_embed_dim=32, text_width=64,
                               context_length=16, layers=1)
    assert prior.config["layers"] == 1
    decoder = build_decoder_preset("shapes-tiny", clip_embed_dim=32, image_size=16,
                                   num_timesteps=10)
    assert decoder.config["image_size"] == 16 and decoder.diffusion.num_timesteps == 10

"""The GPU check's dry run, which must pass on a machine without a GPU: argument parsing,
config generation and validation by the project's own loader, FLOP counting on meta."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestration.config import load_config

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_writes_configs_that_validate(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "validated" in result.stdout
    paths = sorted((out / "configs").glob("*.yaml"))
    assert [p.name for p in paths] == ["gpu-check-zero2.yaml", "gpu-check-zero3.yaml"]
    for path, zero in zip(paths, (2, 3), strict=True):
        config = load_config(str(path))
        assert config.deepspeed.zero_stage == zero
        assert config.deepspeed.precision == "bf16"
        assert config.scaling.use_gpu and config.scaling.num_workers == 1
        assert config.clip.preset == "ViT-B-32" and config.decoder.preset == "cluster-64"
    assert not (out / "work").exists()  # a dry run renders no data


@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A10G", 125.0), ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", 362.0), ("Tesla T4", None)])
def test_gpu_check_peak_table(name, tflops):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_check import peak_tflops

    assert peak_tflops(name, None) == tflops
    assert peak_tflops(name, 100.0) == 100.0  # --peak-tflops wins


def test_sampling_benchmark_times_ddim_at_the_step_ratio_the_goal_needs():
    """DDIM's speed-up is bounded by T / steps, so beside DDIM-50 the sampling benchmark times
    DDIM at T / 15 steps whenever 50 steps cannot reach the 15x goal."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from sampling import sampler_variants, speed_ratios

    assert sampler_variants(300, 50) == {
        "ddpm_full": {"sampler": "ddpm", "steps": 300},
        "ddim_50": {"sampler": "ddim", "steps": 50, "eta": 0.0},
        "ddim_20": {"sampler": "ddim", "steps": 20, "eta": 0.0}}
    assert list(sampler_variants(1000, 50)) == ["ddpm_full", "ddim_50"]  # 50 = T / 20
    ratios = speed_ratios({"ddpm_full": 31.0, "ddim_50": 6.0, "prior_only": 1.0},
                          {"ddpm_full": {}, "ddim_50": {}})
    assert ratios == {"ddpm_full_over_ddim_50": 5.17,
                      "ddpm_full_over_ddim_50_decoder_only": 6.0}


def test_sampling_benchmark_scores_a_release_with_its_own_evaluator():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from sampling import _config

    release = REPO / "release" / "shapes"
    config = _config(None, str(release), ["eval.num_captions=48"])
    assert config.eval.evaluator.uri == str(release / "evaluator")
    assert config.eval.num_captions == 48 and config.run_name == "shapes-2h"
    assert _config(None, None, []).run_name == load_config(
        str(REPO / "configs" / "shapes-paper.yaml")).run_name


def test_clip_table_counts_the_thesis_metrics_over_distinct_captions():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import numpy as np
    from clip_table import table_from_features

    captions = ["a red circle", "a blue square", "a red circle", "a green triangle"]
    text = np.eye(4)[[0, 1, 0, 2]]
    image = text.copy()
    image[3] = [1.0, 0.2, 0, 0]  # the triangle looks most like a red circle
    table = table_from_features(captions, image, text)
    assert (table["samples"], table["distinct_captions"]) == (4, 3)
    assert table["zero_shot_top1"] == 0.75 and table["zero_shot_top5"] == 1.0
    assert table["matching_pair_cosine"] == round((3 + 0) / 4, 4)


def test_embedding_probe_reads_only_what_the_features_tell_apart():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import numpy as np
    import torch
    from embedding_probe import one_object_rows, probe_accuracy

    rows = {"caption": ["a small red circle", "a large blue square and a small red circle",
                        "a medium green triangle", "no shapes here"],
            "image": np.arange(4)}
    images, values = one_object_rows(rows)
    assert images.tolist() == [0, 2]  # the two-object and the unparsed captions are left out
    assert values["shape"].tolist() == ["circle", "triangle"]
    assert values["size"].tolist() == ["small", "medium"]

    # four classes, two of which have identical features: the probe tells 3 in 4 apart
    labels = np.array(["circle", "square", "triangle", "pentagon"] * 25)
    codes = {"circle": [1.0, 0.0, 0.0], "square": [0.0, 1.0, 0.0],
             "triangle": [0.0, 0.0, 1.0], "pentagon": [0.0, 0.0, 1.0]}
    features = torch.tensor([codes[label] for label in labels])
    assert probe_accuracy(features, labels, features, labels) == 0.75

import numpy as np
import pytest
import torch

from models.metrics import (
    clip_score,
    frechet_distance,
    kernel_inception_distance,
    nearest_neighbour_novelty,
    precision_recall,
    prior_cosines,
    zero_shot_topk,
)


def test_frechet_distance_identical_sets_is_zero():
    feats = np.random.default_rng(0).normal(size=(500, 8))
    assert abs(frechet_distance(feats, feats)) < 1e-6


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(20000, 4))
    b = rng.normal(size=(20000, 4)) * 2.0 + np.array([1.0, -1.0, 0.5, 0.0])
    # ||mu||^2 + Tr(I + 4I - 2 * 2I) = 2.25 + 4 * (1 + 4 - 4)
    assert frechet_distance(a, torch.tensor(b)) == pytest.approx(2.25 + 4.0, rel=0.05)


def test_kid_near_zero_for_same_distribution_and_positive_for_shift():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(600, 16)), rng.normal(size=(600, 16))
    same, _ = kernel_inception_distance(a, b, subsets=5, subset_size=300)
    shifted, _ = kernel_inception_distance(a, b + 1.0, subsets=5, subset_size=300)
    assert abs(same) < 0.02 and shifted > 10 * abs(same) + 0.05


def test_precision_recall_sanity():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(400, 2))
    same = precision_recall(real, rng.normal(size=(400, 2)), k=3)
    assert same["precision"] > 0.8 and same["recall"] > 0.8
    collapsed = precision_recall(real, rng.normal(size=(400, 2)) * 0.05, k=3)
    assert collapsed["precision"] > 0.9 and collapsed["recall"] < 0.3  # fidelity, no diversity
    far = precision_recall(real, rng.normal(size=(400, 2)) + 20, k=3)
    assert far["precision"] == 0.0 and far["f1"] == 0.0


def test_embedding_metrics():
    rng = np.random.default_rng(4)
    text = rng.normal(size=(50, 16))
    assert clip_score(text, text) == pytest.approx(1.0)
    accuracy = zero_shot_topk(text + 0.01 * rng.normal(size=text.shape), text,
                              np.arange(50), ks=(1, 5))
    assert accuracy == {"top1": 1.0, "top5": 1.0}
    cosines = prior_cosines(text, text, -text)
    assert cosines["generated_vs_text"] == pytest.approx(1.0)
    assert cosines["generated_vs_image"] == pytest.approx(-1.0)
    assert abs(cosines["generated_vs_random_text"]) < 0.3
    novelty = nearest_neighbour_novelty(text[:5], text, k=3)
    assert novelty["indices"][:, 0].tolist() == [0, 1, 2, 3, 4]
    assert novelty["similarities"].shape == (5, 3) and novelty["mean_nearest"] == pytest.approx(1)

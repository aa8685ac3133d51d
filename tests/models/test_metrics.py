import numpy as np
import pytest
import torch

from models.metrics import (
    clip_score,
    frechet_distance,
    image_set_metrics,
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


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_image_set_metrics_matches_the_individual_metrics():
    rng = np.random.default_rng(5)
    captions, per_caption = 12, 3
    real = _unit(rng.normal(size=(captions, 8))).astype(np.float32)
    text = _unit(real + 0.3 * rng.normal(size=real.shape)).astype(np.float32)
    fake = _unit(np.repeat(real, per_caption, axis=0)
                 + 0.2 * rng.normal(size=(captions * per_caption, 8))).astype(np.float32)
    metrics = image_set_metrics(real, fake, text)
    assert list(metrics) == ["fd_clip", "kid_clip", "precision", "recall", "f1", "clip_score"]
    # the block evaluate_pipeline and the guidance sweep each computed before
    kid, _ = kernel_inception_distance(real, fake, subsets=10, subset_size=captions)
    assert metrics == {"fd_clip": frechet_distance(real, fake), "kid_clip": kid,
                       **precision_recall(real, fake, k=3),
                       "clip_score": clip_score(fake, np.repeat(text, per_caption, axis=0))}
    assert all(isinstance(v, float) for v in metrics.values())
    assert image_set_metrics(torch.from_numpy(real), torch.from_numpy(fake),
                             torch.from_numpy(text)) == pytest.approx(metrics)


def test_image_set_metrics_pairs_each_image_with_its_caption():
    rng = np.random.default_rng(6)
    text = _unit(rng.normal(size=(10, 16)))
    fake = np.repeat(text, 2, axis=0)  # caption 0's two images first, then caption 1's...
    assert image_set_metrics(text, fake, text)["clip_score"] == pytest.approx(1.0)
    assert image_set_metrics(text, fake, -text)["clip_score"] == pytest.approx(-1.0)


def test_image_set_metrics_rejects_a_partial_set_of_images():
    rng = np.random.default_rng(7)
    with pytest.raises(ValueError, match="per caption"):
        image_set_metrics(rng.normal(size=(6, 4)), rng.normal(size=(7, 4)),
                          rng.normal(size=(3, 4)))

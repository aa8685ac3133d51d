import numpy as np
import pytest
import torch

from models.metrics import (
    bootstrap_interval,
    clip_score,
    frechet_distance,
    image_set_metrics,
    kernel_inception_distance,
    kid_subset_estimates,
    nearest_neighbour_novelty,
    paired_bootstrap,
    precision_recall,
    prior_cosines,
    r_precision_hits,
    ranks_true_first,
    reduced_frechet_distance,
    zero_shot_topk,
)


def test_frechet_distance_identical_sets_is_zero():
    feats = np.random.default_rng(0).normal(size=(500, 8))
    assert abs(frechet_distance(feats, feats)) < 1e-6


def test_frechet_distance_is_never_negative_from_rounding():
    # for equal sets the terms cancel to about -1e-16 for many draws; a distance is >= 0,
    # and a bootstrap interval floored at 0 must still contain it
    values = [frechet_distance(x, x) for x in
              (np.random.default_rng(seed).normal(size=(64, 10)) for seed in range(20))]
    assert min(values) >= 0.0 and max(values) < 1e-6


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


def test_image_set_metrics_matches_the_individual_metrics_with_intervals():
    rng = np.random.default_rng(5)
    captions, per_caption = 40, 3
    real = _unit(rng.normal(size=(captions, 8))).astype(np.float32)
    text = _unit(real + 0.3 * rng.normal(size=real.shape)).astype(np.float32)
    fake = _unit(np.repeat(real, per_caption, axis=0)
                 + 0.2 * rng.normal(size=(captions * per_caption, 8))).astype(np.float32)
    metrics = image_set_metrics(real, fake, text)
    values = {k: v for k, v in metrics.items() if not k.endswith(("_lo", "_hi"))}
    assert list(values) == ["fd_clip", "fd_dims", "kid_clip", "precision", "recall", "f1",
                            "clip_score"]
    # 40 real images allow 4 principal components at 10 samples per dimension
    assert metrics["fd_dims"] == 4.0
    assert metrics["fd_clip"] == reduced_frechet_distance(real, fake)[0]
    assert metrics["kid_clip"] == pytest.approx(np.mean(kid_subset_estimates(real, fake)))
    assert {k: metrics[k] for k in ("precision", "recall", "f1")} == pytest.approx(
        precision_recall(real, fake, k=3))
    assert metrics["clip_score"] == pytest.approx(
        clip_score(fake, np.repeat(text, per_caption, axis=0)))
    for name in ("fd_clip", "kid_clip", "precision", "recall", "clip_score"):
        assert metrics[f"{name}_lo"] <= metrics[name] <= metrics[f"{name}_hi"], name
    for name in ("fd_clip", "kid_clip", "clip_score"):  # precision may be 1 for every image
        assert metrics[f"{name}_lo"] < metrics[f"{name}_hi"], name
    assert all(isinstance(v, float) for v in metrics.values())
    assert image_set_metrics(torch.from_numpy(real), torch.from_numpy(fake),
                             torch.from_numpy(text)) == pytest.approx(metrics)


def test_kid_subsets_are_smaller_than_the_sets_so_they_differ():
    rng = np.random.default_rng(9)
    a, b = rng.normal(size=(40, 4)), rng.normal(size=(40, 4)) + 0.5
    estimates = kid_subset_estimates(a, b, subsets=20)
    assert len(set(np.round(estimates, 12))) == 20  # half-size subsets: no repeats
    mean, std = kernel_inception_distance(a, b, subsets=1, seed=3)
    assert std == 0.0 and mean > 0


def test_reduced_frechet_distance_keeps_ten_samples_per_dimension():
    rng = np.random.default_rng(10)
    a, b = rng.normal(size=(300, 64)), rng.normal(size=(200, 64))
    value, dims = reduced_frechet_distance(a, b)
    assert dims == 20 and value > 0
    # identical sets are at distance 0 in any projection
    assert reduced_frechet_distance(a, a)[0] == pytest.approx(0.0, abs=1e-6)


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_items():
    rng = np.random.default_rng(11)
    few, many = rng.normal(size=20), rng.normal(size=2000)
    low, high = bootstrap_interval(few)
    assert low < few.mean() < high
    low_many, high_many = bootstrap_interval(many)
    assert high_many - low_many < (high - low) / 4


def test_paired_bootstrap_sees_a_small_consistent_gain_that_unpaired_noise_would_hide():
    rng = np.random.default_rng(12)
    caption_difficulty = rng.normal(scale=1.0, size=200)  # shared by both models
    champion = caption_difficulty + rng.normal(scale=0.05, size=200)
    candidate = caption_difficulty + 0.05 + rng.normal(scale=0.05, size=200)
    gain = paired_bootstrap(candidate, champion)
    assert gain["low"] > 0 and gain["items"] == 200
    assert gain["difference"] == pytest.approx((candidate - champion).mean())
    same = paired_bootstrap(champion + rng.normal(scale=0.05, size=200), champion)
    assert same["low"] < 0 < same["high"]
    with pytest.raises(ValueError, match="two equal 1-D arrays"):
        paired_bootstrap([1.0, 2.0], [1.0])


def test_r_precision_ranks_each_image_against_other_distinct_captions():
    captions = _unit(np.eye(6)[:, :6] + 0.01)
    hits = r_precision_hits(captions, captions, [0, 1, 2, 3, 4, 5], candidates=4)
    assert hits.tolist() == [True] * 6
    # an image matching caption 1 but labelled with caption 0 never ranks caption 0 first
    # when caption 1 is among the candidates (here: all 6 are)
    wrong = r_precision_hits(captions[[1]], captions, [0], candidates=6)
    assert wrong.tolist() == [False]
    with pytest.raises(ValueError, match="at least 2 distinct captions"):
        r_precision_hits(captions[:1], captions[:1], [0])


def test_ranks_true_first_needs_a_strict_win():
    query = np.array([[1.0, 0.0], [1.0, 0.0]])
    candidates = np.array([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    assert ranks_true_first(query, candidates).tolist() == [True, False]


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

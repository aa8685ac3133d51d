"""Offline evaluation metrics on feature / embedding arrays (numpy or torch inputs).

Image-quality metrics (FD, KID, precision/recall) take features from any encoder; by default
the project uses its own trained CLIP image encoder, since Inception weights cannot be
downloaded here. Embedding metrics follow Luo 2023, sec. 4.6.1-4.6.2 (tables 4.1 and 4.2).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch


def _as_numpy(x) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _unit_rows(x) -> np.ndarray:
    x = _as_numpy(x)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def frechet_distance(feats_a, feats_b) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of Gaussians fitted to [N, D] sets.

    This is FID when the features are Inception pool features; here any feature space works.
    """
    a, b = _as_numpy(feats_a), _as_numpy(feats_b)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    # Tr((S_a S_b)^(1/2)) is the sum of the square roots of the product's eigenvalues (real and
    # non-negative for two covariances, up to rounding): no matrix square root needed, and
    # singular covariances need no regularising offset
    eigenvalues = np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0)
    diff = mu_a - mu_b
    distance = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.sqrt(eigenvalues).sum()
    return max(0.0, float(distance))  # a squared distance; rounding leaves -1e-16 for equal sets


def kernel_inception_distance(feats_a, feats_b, *, subsets: int = 100,
                              subset_size: int | None = None,
                              seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3.

    Averaged over `subsets` random subsets of `subset_size` from each set (Binkowski et al.
    2018, sec. 3). The default size is half the smaller set (at most 1000), so the subsets
    differ: a subset as large as the set would repeat one estimate. Returns (mean, std).
    """
    a, b = _as_numpy(feats_a), _as_numpy(feats_b)
    size = subset_size or min(1000, max(2, min(len(a), len(b)) // 2))
    size = min(size, len(a), len(b))
    rng = np.random.default_rng(seed)
    dim = a.shape[1]
    estimates = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), size, replace=False)]
        y = b[rng.choice(len(b), size, replace=False)]
        k_xx = (x @ x.T / dim + 1.0) ** 3
        k_yy = (y @ y.T / dim + 1.0) ** 3
        k_xy = (x @ y.T / dim + 1.0) ** 3
        off_diag = size * (size - 1)
        mmd = ((k_xx.sum() - np.trace(k_xx)) / off_diag + (k_yy.sum() - np.trace(k_yy)) / off_diag
               - 2.0 * k_xy.mean())
        estimates.append(mmd)
    return float(np.mean(estimates)), float(np.std(estimates))


def principal_directions(feats, dims: int) -> np.ndarray:
    """[D, dims] orthonormal directions of largest variance of `feats` [N, D]."""
    x = _as_numpy(feats)
    _, _, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    return vt[:dims].T


def reduced_frechet_distance(real, fake, *, samples_per_dim: int = 10) -> tuple[float, int]:
    """(FD, dims): the Frechet distance on the real features' top principal components, with
    at least `samples_per_dim` samples per dimension in the smaller set.

    A covariance fitted to fewer samples than dimensions is singular, and FD's bias grows
    like D^2 / N (Chong & Forsyth 2020), so with a few hundred images we compare in a space
    the samples can actually estimate, and report which.
    """
    real, fake = _as_numpy(real), _as_numpy(fake)
    dims = max(1, min(real.shape[1], min(len(real), len(fake)) // samples_per_dim))
    basis = principal_directions(real, dims)
    return frechet_distance(real @ basis, fake @ basis), dims


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    distances = scipy.spatial.distance.cdist(x, x)
    return np.sort(distances, axis=1)[:, k]  # column 0 is the point itself


def precision_recall(real, fake, *, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds.

    Precision: share of fake samples inside some real sample's k-NN ball (fidelity).
    Recall: share of real samples inside some fake sample's k-NN ball (diversity).
    """
    real, fake = _as_numpy(real), _as_numpy(fake)

    def coverage(reference: np.ndarray, queries: np.ndarray) -> float:
        radii = _knn_radii(reference, k)
        inside = scipy.spatial.distance.cdist(queries, reference) <= radii[None, :]
        return float(inside.any(axis=1).mean())

    precision, recall = coverage(real, fake), coverage(fake, real)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def clip_score(image_emb, text_emb) -> float:
    """Mean cosine similarity of matching (image, text) rows, in [-1, 1].

    Plain mean cosine, as Luo 2023 reports it (0.852 for its CLIP, table 4.1); multiply by 100
    and clip at 0 for the CLIPScore convention of Hessel et al.
    """
    return float((_unit_rows(image_emb) * _unit_rows(text_emb)).sum(axis=1).mean())


def image_set_metrics(real_emb, fake_emb, text_emb, *, seed: int = 0) -> dict[str, float]:
    """Generated vs real images in one feature space, each with a 95% interval (`_lo`, `_hi`):
    fd_clip on principal components (`fd_dims` of them), kid_clip (100 subsets),
    precision/recall/f1 (k=3) and clip_score of each generated image against its caption.

    `text_emb` [C, D] holds one row per caption; `fake_emb` [C * n, D] the n images generated
    per caption, grouped by caption (caption 0's n images first), as the pipeline returns them.
    """
    real, fake, text = _as_numpy(real_emb), _as_numpy(fake_emb), _as_numpy(text_emb)
    if len(text) == 0 or len(fake) % len(text):
        raise ValueError(f"{len(fake)} generated embeddings are not a whole number of images "
                         f"per caption for {len(text)} captions")
    fd, dims = reduced_frechet_distance(real, fake)
    kid_estimates = kid_subset_estimates(real, fake, seed=seed)
    inside = manifold_membership(real, fake, k=3)
    cosines = (_unit_rows(fake) * _unit_rows(np.repeat(text, len(fake) // len(text), axis=0))
               ).sum(axis=1)
    metrics = {"fd_clip": fd, "fd_dims": float(dims), "kid_clip": float(np.mean(kid_estimates))}
    metrics.update(_named_interval("fd_clip", fd_interval(real, fake, dims, seed=seed)))
    metrics.update(_named_interval("kid_clip", tuple(np.quantile(kid_estimates, [0.025, 0.975]))))
    precision, recall = float(inside["precision"].mean()), float(inside["recall"].mean())
    metrics.update(precision=precision, recall=recall,
                   f1=2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    metrics.update(_named_interval("precision", bootstrap_interval(inside["precision"], seed=seed)))
    metrics.update(_named_interval("recall", bootstrap_interval(inside["recall"], seed=seed)))
    metrics["clip_score"] = float(cosines.mean())
    metrics.update(_named_interval("clip_score", bootstrap_interval(cosines, seed=seed)))
    return metrics


def _named_interval(name: str, interval) -> dict[str, float]:
    return {f"{name}_lo": float(interval[0]), f"{name}_hi": float(interval[1])}


def kid_subset_estimates(real, fake, *, subsets: int = 100, seed: int = 0) -> np.ndarray:
    """The per-subset KID estimates behind `kernel_inception_distance`'s mean: their 2.5-97.5%
    spread is a conservative interval (each subset is smaller than the whole set)."""
    estimates = []
    for index in range(subsets):
        value, _ = kernel_inception_distance(real, fake, subsets=1, seed=seed * 100_003 + index)
        estimates.append(value)
    return np.asarray(estimates)


def fd_interval(real, fake, dims: int, *, reps: int = 200, seed: int = 0,
                level: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval of the reduced FD: both sets resampled, the same basis.

    Resampled sets repeat samples, which shifts every bootstrap FD upwards, so the interval is
    the bootstrap spread around its median, re-centred on the estimate (and floored at 0)."""
    real, fake = _as_numpy(real), _as_numpy(fake)
    basis = principal_directions(real, dims)
    real_p, fake_p = real @ basis, fake @ basis
    estimate = frechet_distance(real_p, fake_p)
    rng = np.random.default_rng(seed)
    values = [frechet_distance(real_p[rng.integers(0, len(real_p), len(real_p))],
                               fake_p[rng.integers(0, len(fake_p), len(fake_p))])
              for _ in range(reps)]
    low, median, high = np.quantile(values, [(1 - level) / 2, 0.5, (1 + level) / 2])
    return max(0.0, estimate - (median - low)), estimate + (high - median)


def manifold_membership(real, fake, *, k: int = 3) -> dict[str, np.ndarray]:
    """Per-sample indicators behind improved precision/recall (Kynkaanniemi et al. 2019):
    "precision" [N_fake] is each fake inside some real k-NN ball, "recall" [N_real] each real
    inside some fake ball. Their means are the metrics; bootstrapping them gives intervals
    conditional on the two fitted manifolds."""
    real, fake = _as_numpy(real), _as_numpy(fake)

    def inside(reference: np.ndarray, queries: np.ndarray) -> np.ndarray:
        radii = _knn_radii(reference, k)
        return (scipy.spatial.distance.cdist(queries, reference) <= radii[None, :]).any(axis=1)

    return {"precision": inside(real, fake).astype(float),
            "recall": inside(fake, real).astype(float)}


def bootstrap_interval(values, *, reps: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-item values (Efron & Tibshirani 1993)."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (reps, len(values)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def paired_bootstrap(candidate, champion, *, reps: int = 2000, level: float = 0.95,
                     seed: int = 0) -> dict[str, float]:
    """Mean per-item difference candidate - champion and its paired bootstrap interval.

    Both arrays hold one score per caption, scored on the same captions and seeds, so the
    caption-to-caption variation cancels and only the models' difference is resampled.
    """
    a, b = np.asarray(candidate, dtype=np.float64), np.asarray(champion, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"paired scores need two equal 1-D arrays of >= 2 items; got "
                         f"{a.shape} and {b.shape}")
    low, high = bootstrap_interval(a - b, reps=reps, level=level, seed=seed)
    return {"difference": float((a - b).mean()), "low": low, "high": high, "items": len(a)}


def ranks_true_first(query, candidates) -> np.ndarray:
    """[N] bool: does each query rank its candidate 0 (the true one) strictly first?

    `query` [N, D]; `candidates` [N, K, D], the true candidate at index 0 of each row.
    """
    q = _unit_rows(query)
    c = _as_numpy(candidates)
    c = c / np.maximum(np.linalg.norm(c, axis=2, keepdims=True), 1e-12)
    sims = np.einsum("nd,nkd->nk", q, c)
    return sims[:, 0] > sims[:, 1:].max(axis=1)


def r_precision_hits(image_emb, caption_emb, image_caption, *, candidates: int = 32,
                     seed: int = 0) -> np.ndarray:
    """[N] bool: R-precision with R = 1 (Park et al. 2021, CLIP-R-Precision): each image's own
    caption ranked first among itself and `candidates - 1` other distinct captions drawn from
    `caption_emb` [C, D] (rows must be distinct captions); `image_caption` [N] indexes it."""
    caption_emb = _as_numpy(caption_emb)
    count = len(caption_emb)
    if count < 2:
        raise ValueError("R-precision needs at least 2 distinct captions")
    others = min(candidates - 1, count - 1)
    rng = np.random.default_rng(seed)
    rows = []
    for own in np.asarray(image_caption):
        pool = rng.choice(count - 1, others, replace=False)
        pool = pool + (pool >= own)  # skip the image's own caption
        rows.append(np.concatenate([[own], pool]))
    return ranks_true_first(image_emb, caption_emb[np.asarray(rows)])


def zero_shot_topk(image_emb, caption_emb, labels, *, ks=(1, 5)) -> dict[str, float]:
    """Retrieval accuracy: is the image's own caption among the k most similar captions?

    `caption_emb` [C, D] is the candidate caption set; `labels` [N] the index of each image's
    caption in it (Luo 2023, sec. 4.6.1, table 4.1, takes every test caption as the candidates).
    """
    sims = _unit_rows(image_emb) @ _unit_rows(caption_emb).T
    labels = np.asarray(labels)
    ranking = np.argsort(-sims, axis=1)
    return {f"top{k}": float((ranking[:, :k] == labels[:, None]).any(axis=1).mean()) for k in ks}


def prior_cosines(generated, text, true_image, *, seed: int = 0) -> dict[str, float]:
    """Luo 2023, table 4.2: mean cosines of generated embeddings vs their text, vs the true image
    embedding, the text-vs-true-image baseline, and vs a random (shuffled) other text."""
    gen, txt, img = _unit_rows(generated), _unit_rows(text), _unit_rows(true_image)
    n = len(gen)
    # A random derangement, so no sample is paired with its own text.
    shift = np.random.default_rng(seed).integers(1, n) if n > 1 else 0
    other = np.roll(np.arange(n), shift)
    return {"generated_vs_text": float((gen * txt).sum(1).mean()),
            "generated_vs_image": float((gen * img).sum(1).mean()),
            "text_vs_image": float((txt * img).sum(1).mean()),
            "generated_vs_random_text": float((gen * txt[other]).sum(1).mean())}


def nearest_neighbour_novelty(generated, train, *, k: int = 3) -> dict[str, object]:
    """Cosine similarity to the k nearest training embeddings (Luo 2023, sec. 4.6.3, fig. 4.10).

    High max similarity (close to 1) flags memorised samples. Returns the neighbour indices
    [N, k], their similarities [N, k] and the mean of the nearest similarity.
    """
    sims = _unit_rows(generated) @ _unit_rows(train).T
    indices = np.argsort(-sims, axis=1)[:, :k]
    top = np.take_along_axis(sims, indices, axis=1)
    return {"indices": indices, "similarities": top, "mean_nearest": float(top[:, 0].mean())}

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
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = scipy.linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(covmean).all():
        # Singular product (few samples, many dims): regularise as the reference FID code does.
        offset = np.eye(cov_a.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = np.real(covmean)  # sqrtm can return tiny imaginary parts from rounding
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))


def kernel_inception_distance(feats_a, feats_b, *, subsets: int = 10, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3.

    Averaged over `subsets` random subsets of `subset_size` from each set (Binkowski et al.
    2018). Returns (mean, std) over subsets.
    """
    a, b = _as_numpy(feats_a), _as_numpy(feats_b)
    size = min(subset_size, len(a), len(b))
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


def image_set_metrics(real_emb, fake_emb, text_emb) -> dict[str, float]:
    """Generated vs real images in one feature space: fd_clip, kid_clip (mean over 10 subsets),
    precision/recall/f1 (k=3) and clip_score of each generated image against its caption.

    `text_emb` [C, D] holds one row per caption; `fake_emb` [C * n, D] the n images generated
    per caption, grouped by caption (caption 0's n images first), as the pipeline returns them.
    """
    real, fake, text = _as_numpy(real_emb), _as_numpy(fake_emb), _as_numpy(text_emb)
    if len(text) == 0 or len(fake) % len(text):
        raise ValueError(f"{len(fake)} generated embeddings are not a whole number of images "
                         f"per caption for {len(text)} captions")
    kid, _ = kernel_inception_distance(real, fake, subsets=10,
                                       subset_size=min(len(real), len(fake)))
    return {"fd_clip": frechet_distance(real, fake), "kid_clip": kid,
            **precision_recall(real, fake, k=3),
            "clip_score": clip_score(fake, np.repeat(text, len(fake) // len(text), axis=0))}


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

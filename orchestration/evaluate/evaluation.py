"""Stage `eval`: assemble the text-to-image pipeline and score it on held-out captions.

Every score comes from the dataset's reference evaluator (`orchestration.evaluate.evaluator`), never
from the model under test: Frechet distance on principal components and KID in its feature
space, precision/recall/F1, CLIP score, R-precision and, on structured (shapes) captions,
per-attribute accuracy and the zero-shot captions of Luo 2023 (sec. 4.6.4: rephrased, shape
only, colour only), each with a 95% bootstrap interval. The per-caption scores are kept,
so the promotion gate can compare two models caption by caption. The prior's cosine table
(Luo 2023, table 4.2) stays in the model's own CLIP space, where the prior works.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from data_pipelines.shapes import (
    ATTRIBUTES,
    ZERO_SHOT_PROBES,
    attribute_classes,
    attribute_variants,
    held_out_pair_in,
    zero_shot_prompt,
)
from data_pipelines.streaming import image_caption_dataset
from models.metrics import (
    bootstrap_interval,
    image_set_metrics,
    nearest_neighbour_novelty,
    paired_bootstrap,
    prior_cosines,
    r_precision_hits,
    ranks_true_first,
)
from models.unclip_pipeline import UnCLIPPipeline, images_to_grid
from orchestration.common.layout import portable_uri
from orchestration.config import Config, ConfigError
from orchestration.evaluate.evaluator import Evaluator
from orchestration.stages import STAGES
from orchestration.train.tasks.base import load_portable


@dataclass
class EvalReport:
    """What one evaluation produced: metrics (with `_lo`/`_hi` intervals), one score per
    caption for each per-caption metric, and what makes two reports comparable."""

    metrics: dict[str, float]
    per_caption: dict[str, list[float]]
    captions_sha: str
    seed: int
    evaluator: str

    def comparable_with(self, other: EvalReport) -> str | None:
        """None, or why the two cannot be compared caption by caption."""
        if self.evaluator != other.evaluator:
            return f"different evaluators ({self.evaluator} vs {other.evaluator})"
        if (self.captions_sha, self.seed) != (other.captions_sha, other.seed):
            return "different captions or seeds"
        return None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> EvalReport:
        return cls(**json.loads(text))


def captions_digest(captions: list[str], images_per_caption: int) -> str:
    text = json.dumps([captions, images_per_caption])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def assemble_pipeline(config: Config) -> UnCLIPPipeline:
    """The three components' portable EMA weights plus the configured sampling defaults."""
    components = {stage: load_portable(portable_uri(config, stage))[1] for stage in STAGES}
    return UnCLIPPipeline(**components, context_length=config.data.preprocess.context_length,
                          sampling=pipeline_sampling(config)).eval()


def pipeline_sampling(config: Config) -> dict:
    """The config's sampling section in the pipeline's own vocabulary."""
    s = config.sampling
    return {"sampler": s.sampler, "steps": s.decoder_steps, "prior_steps": s.prior_steps,
            "prior_guidance": s.prior_guidance, "decoder_guidance": s.decoder_guidance,
            "eta": s.eta, "num_candidates": s.num_candidates}


def held_out_rows(config: Config, count: int) -> dict:
    """The first `count` held-out (test split) rows in a fixed order, unaugmented."""
    dataset = image_caption_dataset(config.data.uri, "test", config.data.preprocess,
                                    train=False, seed=config.seed)
    return dataset.limit(count).take_batch(count, batch_format="numpy")


def _train_rows(config: Config, count: int) -> dict:
    dataset = image_caption_dataset(config.data.uri, "train", config.data.preprocess,
                                    train=False, seed=config.seed)
    return dataset.limit(count).take_batch(count, batch_format="numpy")


def _with_interval(name: str, values: np.ndarray, reps: int, seed: int) -> dict[str, float]:
    low, high = bootstrap_interval(values, reps=reps, seed=seed)
    return {name: float(np.mean(values)), f"{name}_lo": low, f"{name}_hi": high}


class CaptionScorer:
    """Scores images against captions with one evaluator; caches caption features."""

    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator
        self._text: dict[str, np.ndarray] = {}

    def text(self, captions: list[str]) -> np.ndarray:
        missing = sorted({c for c in captions if c not in self._text})
        if missing:
            self._text.update(zip(missing, self.evaluator.text_features(missing), strict=True))
        return np.stack([self._text[c] for c in captions])

    def r_precision(self, image_feats, captions: list[str], candidates: int,
                    seed: int) -> np.ndarray:
        distinct = sorted(set(captions))
        index = {c: i for i, c in enumerate(distinct)}
        return r_precision_hits(image_feats, self.text(distinct), [index[c] for c in captions],
                                candidates=candidates, seed=seed).astype(float)

    def attribute(self, image_feats, captions: list[str], attribute: str) -> np.ndarray | None:
        """[N] share of each image's objects whose `attribute` the evaluator recognises, or
        None when some caption is not a structured (shapes) caption."""
        scores = []
        for feat, caption in zip(image_feats, captions, strict=True):
            objects = attribute_variants(caption, attribute)
            if not objects:
                return None
            hits = [ranks_true_first(feat[None], self.text(options)[None])[0]
                    for options in objects]
            scores.append(float(np.mean(hits)))
        return np.asarray(scores)

    def ensemble_hits(self, image_feats, captions: list[str], attribute: str) -> np.ndarray:
        """[N] 1 where the image's nearest class (the mean of the evaluator's features of every
        caption with that colour or shape) is its one-object caption's own value."""
        hits = []
        for feat, caption in zip(image_feats, captions, strict=True):
            classes, own = attribute_classes(caption, attribute)
            centroids = np.stack([self.text(c).mean(axis=0) for c in classes])
            centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
            hits.append(float(np.argmax(centroids @ feat) == own))
        return np.asarray(hits)


def score_images(scorer: CaptionScorer, *, real_feats: np.ndarray, real_captions: list[str],
                 fake_feats: np.ndarray, captions: list[str], images_per_caption: int,
                 config: Config) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(metrics, per-caption scores) of generated images (features grouped by caption) against
    the held-out images and their captions, all in the evaluator's space."""
    ev, seed = config.eval, config.seed
    image_captions = [c for c in captions for _ in range(images_per_caption)]
    metrics = image_set_metrics(real_feats, fake_feats, scorer.text(captions), seed=seed)
    per_image = {"clip_score": (fake_feats * scorer.text(image_captions)).sum(axis=1),
                 "r_precision": scorer.r_precision(fake_feats, image_captions,
                                                   ev.r_precision_candidates, seed)}
    metrics.update(_with_interval("r_precision", per_image["r_precision"], ev.bootstrap_reps,
                                  seed))
    metrics["r_precision_real"] = float(scorer.r_precision(
        real_feats, real_captions, ev.r_precision_candidates, seed).mean())
    held_out = np.array([held_out_pair_in(c, config.data.shapes.held_out)
                         for c in image_captions])
    for attribute in ATTRIBUTES:
        hits = scorer.attribute(fake_feats, image_captions, attribute)
        if hits is None:
            continue
        name = f"attr_{attribute}"
        per_image[name] = hits
        metrics.update(_with_interval(name, hits, ev.bootstrap_reps, seed))
        for subset, mask in (("held_out", held_out), ("seen", ~held_out)):
            if mask.any():
                metrics.update(_with_interval(f"{name}_{subset}", hits[mask], ev.bootstrap_reps,
                                              seed))
        metrics[f"{name}_real"] = float(scorer.attribute(real_feats, real_captions,
                                                         attribute).mean())
    per_caption = {name: values.reshape(len(captions), images_per_caption).mean(axis=1).tolist()
                   for name, values in per_image.items()}
    return metrics, per_caption


# What conditions the decoder: the ablation of Zbinden 2022, sec. 5.1 (table 5.1)
CONDITIONINGS = {"prior": "the full pipeline (text -> prior -> decoder)",
                 "image": "decoder-only reconstruction from the true image's CLIP embedding",
                 "text": "no prior: the CLIP text embedding fed straight to the decoder"}


def _generate(pipeline: UnCLIPPipeline, captions: list[str], real_images: torch.Tensor,
              conditioning: str, config: Config) -> torch.Tensor:
    n, seed = config.eval.images_per_caption, config.seed
    if conditioning == "prior":
        return pipeline.generate(captions, num_images_per_prompt=n, seed=seed)
    image_emb = (pipeline.clip.encode_image(real_images, normalize=True)
                 if conditioning == "image" else None)
    return pipeline.generate_without_prior(captions, image_emb=image_emb,
                                           num_images_per_prompt=n, seed=seed)


@torch.no_grad()
def evaluate_pipeline(config: Config, pipeline: UnCLIPPipeline, evaluator: Evaluator,
                      out_dir: Path, log=print, conditioning: str = "prior") -> EvalReport:
    """Generate for held-out captions, score with the reference evaluator, write the grids.
    `conditioning` other than "prior" scores an ablation (see CONDITIONINGS)."""
    start = time.monotonic()
    ev = config.eval
    rows = held_out_rows(config, ev.num_captions)
    captions = [str(c) for c in rows["caption"]]
    real_images = torch.from_numpy(np.array(rows["image"]))  # Ray blocks are read-only
    log(f"[eval] generating {len(captions) * ev.images_per_caption} images for "
        f"{len(captions)} held-out captions ({CONDITIONINGS[conditioning]})")
    generated = _generate(pipeline, captions, real_images, conditioning, config)
    fake = generated.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    scorer = CaptionScorer(evaluator)
    real_feats = evaluator.image_features(real_images)
    fake_feats = evaluator.image_features(fake)
    metrics, per_caption = score_images(
        scorer, real_feats=real_feats, real_captions=captions, fake_feats=fake_feats,
        captions=captions, images_per_caption=ev.images_per_caption, config=config)
    if conditioning == "prior":
        metrics.update(zero_shot_metrics(config, pipeline, scorer, captions, real_feats, log))
    metrics.update(_model_space_metrics(config, pipeline, captions, real_images))
    train = _train_rows(config, 256)
    novelty = nearest_neighbour_novelty(
        fake_feats, evaluator.image_features(torch.from_numpy(np.array(train["image"]))), k=3)
    metrics["nn_train_similarity"] = float(novelty["mean_nearest"])
    metrics["eval_seconds"] = round(time.monotonic() - start, 1)
    report = EvalReport(metrics=metrics, per_caption=per_caption,
                        captions_sha=captions_digest(captions, ev.images_per_caption),
                        seed=config.seed, evaluator=evaluator.identity)
    _write_outputs(config, pipeline, report, real_images, generated, out_dir)
    shown = {k: round(v, 4) for k, v in metrics.items() if not k.endswith(("_lo", "_hi"))}
    log(f"[eval] by {evaluator.identity}: {json.dumps(shown)}")
    return report


def zero_shot_metrics(config: Config, pipeline: UnCLIPPipeline, scorer: CaptionScorer,
                      captions: list[str], real_feats: np.ndarray, log=print) -> dict:
    """The zero-shot checks of Luo 2023, sec. 4.6.4, on the first `eval.zero_shot_captions`
    distinct one-object held-out captions: images generated from rephrased captions ("a small
    rectangle that is gold": colour and shape both right) and from partial ones ("a small
    rectangle": shape right; "gold": colour right), scored by the reference evaluator against
    the dataset's own caption. `_real` is the same score of the real test images."""
    first = {}
    for index, caption in enumerate(captions):
        if zero_shot_prompt(caption, "rephrased") and caption not in first:
            first[caption] = index
    chosen = list(first)[:config.eval.zero_shot_captions]
    if not chosen:
        return {}
    log(f"[eval] zero-shot: rephrased and partial versions of {len(chosen)} one-object captions")
    real = real_feats[[first[c] for c in chosen]]
    metrics = {}
    for probe in ZERO_SHOT_PROBES:
        prompts = [zero_shot_prompt(c, probe) for c in chosen]
        images = pipeline.generate(prompts, seed=config.seed)
        feats = scorer.evaluator.image_features(images.permute(0, 3, 1, 2).float() / 127.5 - 1)
        if probe == "rephrased":
            hits, real_hits = (scorer.attribute(f, chosen, "colour_shape") for f in (feats, real))
        else:
            attribute = "shape" if probe == "shape_only" else "colour"
            hits, real_hits = (scorer.ensemble_hits(f, chosen, attribute) for f in (feats, real))
        metrics.update(_with_interval(f"zero_shot_{probe}", hits, config.eval.bootstrap_reps,
                                      config.seed))
        metrics[f"zero_shot_{probe}_real"] = float(real_hits.mean())
    return metrics


def _model_space_metrics(config: Config, pipeline: UnCLIPPipeline, captions: list[str],
                         real_images: torch.Tensor) -> dict[str, float]:
    """The prior's cosines in the model's own CLIP space (Luo 2023, table 4.2)."""
    real_emb = pipeline.clip.encode_image(real_images, normalize=True).numpy()
    text_emb_raw, encodings = pipeline.encode_text(captions)
    prior_emb = pipeline.prior.sample(text_emb=text_emb_raw, text_tokens=encodings,
                                      generator=torch.Generator().manual_seed(config.seed))
    return {f"prior_{k}": v for k, v in prior_cosines(
        prior_emb.numpy(), text_emb_raw.numpy(), real_emb).items()}


def _write_outputs(config: Config, pipeline: UnCLIPPipeline, report: EvalReport,
                   real_images: torch.Tensor, generated: torch.Tensor, out_dir: Path) -> None:
    ev = config.eval
    out_dir.mkdir(parents=True, exist_ok=True)
    count = min(8, len(real_images))
    side = torch.cat([((real_images[:count] + 1) * 127.5).round().byte().permute(0, 2, 3, 1),
                      generated[: count * ev.images_per_caption: ev.images_per_caption]])
    images_to_grid(side, nrow=count).resize(
        (count * 96, 2 * 96), 0).save(out_dir / "eval_real_vs_generated.png")
    prompts = ev.grid_prompts
    grid = pipeline.generate(prompts, num_images_per_prompt=4, seed=config.seed)
    images_to_grid(grid, nrow=4).resize((4 * 96, len(prompts) * 96), 0).save(
        out_dir / "samples.png")
    (out_dir / "prompts.json").write_text(json.dumps(prompts, indent=2))
    (out_dir / "metrics.json").write_text(json.dumps(report.metrics, indent=2))
    (out_dir / "evaluation.json").write_text(report.to_json())


def evaluate_model(model_uri: str, config: Config, out_dir: Path, log=print,
                   sampling: dict | None = None, conditioning: str = "prior") -> EvalReport:
    """`unclip eval --model URI`: any model (registered version or alias, run, saved pipeline
    folder) scored on the config's dataset by the config's reference evaluator, with the same
    code as the pipeline's eval stage. `sampling` overrides the model's sampling defaults
    (e.g. {"sampler": "ddpm", "steps": None}) to compare samplers on the same weights."""
    import dataclasses
    import tempfile

    from orchestration.common.data_check import ensure_dataset
    from orchestration.common.ray_runtime import connect
    from orchestration.evaluate.evaluator import ensure_evaluator
    from orchestration.registry.registry import resolve_model_uri

    connect(config)
    ensure_dataset(config, log=log)
    evaluator = ensure_evaluator(config, log=log)
    with tempfile.TemporaryDirectory(prefix="unclip-eval-") as tmp:
        directory = resolve_model_uri(model_uri, tracking_uri=config.mlflow.tracking_uri,
                                      dst_dir=Path(tmp) / "model")
        pipeline = UnCLIPPipeline.load(directory).eval()
    if sampling:
        pipeline.sampling = dataclasses.replace(pipeline.sampling, **sampling)
        log(f"[eval] sampling: {dataclasses.asdict(pipeline.sampling)}")
    return evaluate_pipeline(config, pipeline, evaluator, out_dir, log=log,
                             conditioning=conditioning)


def read_report(path: str | Path) -> EvalReport:
    """An evaluation's report from its evaluation.json, or from a folder holding one: an
    `unclip eval` output, a pipeline's outputs/<run_name>, or a release (its eval/)."""
    path = Path(path)
    for candidate in (path, path / "evaluation.json", path / "eval" / "evaluation.json"):
        if candidate.is_file():
            try:
                return EvalReport.from_json(candidate.read_text())
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{candidate}: not an evaluation report ({exc})") from None
    raise ConfigError(f"{path}: no evaluation.json there; pass the folder `unclip eval`, the "
                      "pipeline or `unclip release` wrote (or the file itself)")


def paired_comparison(candidate: EvalReport, baseline: EvalReport, *,
                      reps: int = 5000) -> list[dict]:
    """Per metric scored caption by caption in both: the mean difference candidate - baseline
    with its 95% paired bootstrap interval (the promotion gate's test, for any two reports of
    the same captions, seeds and evaluator)."""
    why_not = candidate.comparable_with(baseline)
    if why_not:
        raise ConfigError(f"cannot compare caption by caption: {why_not}; evaluate both with "
                          "the same config (captions, seed) and evaluator")
    rows = []
    for name in candidate.per_caption:
        if name in baseline.per_caption:
            stats = paired_bootstrap(candidate.per_caption[name], baseline.per_caption[name],
                                     reps=reps)
            verdict = ("better" if stats["low"] > 0 else "worse" if stats["high"] < 0
                       else "within the uncertainty")
            rows.append({"metric": name, "candidate": float(np.mean(candidate.per_caption[name])),
                         "baseline": float(np.mean(baseline.per_caption[name])), **stats,
                         "verdict": verdict})
    return rows


def format_comparison(rows: list[dict], evaluator: str) -> str:
    lines = [f"paired over {rows[0]['items'] if rows else 0} captions, evaluator {evaluator}",
             f"{'metric':20s} {'candidate':>9s} {'baseline':>9s} {'difference':>10s}  "
             f"{'95% interval':20s} verdict"]
    for row in rows:
        interval = f"[{row['low']:+.4f}, {row['high']:+.4f}]"
        lines.append(f"{row['metric']:20s} {row['candidate']:9.4f} {row['baseline']:9.4f} "
                     f"{row['difference']:+10.4f}  {interval:20s} {row['verdict']}")
    return "\n".join(lines)


def format_report(report: EvalReport) -> str:
    """One line per metric: value and, where it has one, its 95% interval."""
    lines = [f"evaluator: {report.evaluator}"]
    for name, value in report.metrics.items():
        if name.endswith(("_lo", "_hi")):
            continue
        low, high = report.metrics.get(f"{name}_lo"), report.metrics.get(f"{name}_hi")
        interval = f"  [{low:.4g}, {high:.4g}]" if low is not None and high is not None else ""
        lines.append(f"{name:32s} {value:.4g}{interval}")
    return "\n".join(lines)

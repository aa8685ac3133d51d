"""How much of each caption attribute a CLIP's image embedding carries: a linear probe.

The decoder draws from the CLIP image embedding alone (the prior only predicts one), so a shape
the embedding does not carry is a shape no decoder can draw. This fits one multinomial
logistic regression per attribute (shape, colour, size) on the embeddings of one-object train
images and reports its accuracy on the one-object held-out images, for each CLIP given. When
the pipeline's CLIP carries shape nearly as well as the reference evaluator, the decoder, not
the embedding, limits shape accuracy.

    python benchmarks/embedding_probe.py -c release/shapes/eval.yaml \
        release/shapes release/shapes/evaluator
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from orchestration.evaluate.evaluator import Evaluator, load_evaluator

ATTRIBUTES = ("shape", "colour", "size")


def load_image_encoder(source: str) -> Evaluator:
    """A portable CLIP folder (e.g. an evaluator) or a pipeline or release folder's CLIP."""
    from models.unclip_pipeline import UnCLIPPipeline

    if (Path(source) / "weights.safetensors").exists():
        return load_evaluator(source)
    clip = UnCLIPPipeline.load(source).clip.eval()
    return Evaluator(clip=clip, context_length=int(clip.context_length), identity=source,
                     uri=source)


def embed(encoder: Evaluator, images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(encoder.image_features(torch.from_numpy(images)))


def one_object_rows(rows: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Images of one-object captions and each attribute's value for them."""
    from data_pipelines.shapes import caption_objects

    keep, values = [], {name: [] for name in ATTRIBUTES}
    for index, caption in enumerate(rows["caption"]):
        objects = caption_objects(str(caption))
        if objects is not None and len(objects) == 1:
            keep.append(index)
            for name in ATTRIBUTES:
                values[name].append(objects[0][name])
    return np.asarray(rows["image"])[keep], {k: np.array(v) for k, v in values.items()}


def probe_accuracy(train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor,
                   test_y: np.ndarray, weight_decay: float = 1e-4) -> float:
    """Held-out accuracy of a multinomial logistic regression fitted with L-BFGS."""
    classes = sorted(set(train_y))
    index = {value: i for i, value in enumerate(classes)}
    target = torch.tensor([index[v] for v in train_y])
    mean, scale = train_x.mean(0), train_x.std(0) + 1e-6  # standardise: one step size fits all
    features = (train_x - mean) / scale
    layer = torch.nn.Linear(features.shape[1], len(classes))
    optimiser = torch.optim.LBFGS(layer.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(features), target)
        loss = loss + weight_decay * layer.weight.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        predicted = layer((test_x - mean) / scale).argmax(1).numpy()
    return float(np.mean([classes[p] == v for p, v in zip(predicted, test_y, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clips", nargs="+", help="pipeline/release folders or portable CLIPs")
    parser.add_argument("-c", "--config", required=True, help="the dataset's config")
    parser.add_argument("--train-rows", type=int, default=8000,
                        help="train rows to read (the one-object ones are fitted)")
    args = parser.parse_args()

    from data_pipelines.shards import read_manifest
    from orchestration.config import load_config
    from orchestration.evaluate.evaluation import _train_rows, held_out_rows

    torch.manual_seed(0)
    config = load_config(args.config)
    test_count = read_manifest(config.data.uri).splits["test"].num_samples
    train_images, train_values = one_object_rows(_train_rows(config, args.train_rows))
    test_images, test_values = one_object_rows(held_out_rows(config, test_count))
    report = {"train_images": len(train_images), "test_images": len(test_images), "probes": {}}
    for source in args.clips:
        clip = load_image_encoder(source)
        train_x, test_x = embed(clip, train_images), embed(clip, test_images)
        report["probes"][source] = {name: round(probe_accuracy(
            train_x, train_values[name], test_x, test_values[name]), 4) for name in ATTRIBUTES}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

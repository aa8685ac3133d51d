"""`unclip release`: a trained pipeline as a small folder anyone can use without training.

The folder holds the pipeline (its config.json and each component's parameters in fp16
safetensors: half the bytes, and loading casts them back to the model's fp32; buffers such as
the noise schedule keep their precision), the reference evaluator (also fp16), `eval.yaml`
(the dataset recipe and settings that re-check the numbers) and `release.json` (metrics,
lineage, evaluator identity, dataset manifest hash, source commit). It is written under a
`.partial` name and renamed only once the evaluation is in, so a folder that exists is whole.

`unclip generate --model <folder>` and the serving commands take it as any pipeline folder;
`unclip eval --model <folder>` finds `release.json` and re-checks the release's metrics.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from orchestration.config import Config, ConfigError, dump_yaml, load_config

RELEASE_FILE = "release.json"
EVAL_CONFIG_FILE = "eval.yaml"
EVALUATOR_DIR = "evaluator"
FORMAT = 1

if TYPE_CHECKING:  # torch loads only inside the commands that need it
    import torch


def is_release(directory: str | Path) -> bool:
    return (Path(directory) / RELEASE_FILE).is_file()


def read_release(directory: str | Path) -> dict:
    return json.loads((Path(directory) / RELEASE_FILE).read_text())


def release_config(directory: str | Path, overrides: list[str] | None = None) -> Config:
    """The config that re-checks a release: its eval.yaml, with the evaluator inside it."""
    directory = Path(directory).expanduser().absolute()
    path = directory / EVAL_CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{directory} is a release without {EVAL_CONFIG_FILE}; pass -c CONFIG")
    evaluator = f"eval.evaluator.uri={directory / EVALUATOR_DIR}"
    return load_config(path, [evaluator, *(overrides or [])])


def half_parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state with float parameters in fp16; buffers (e.g. a diffusion schedule,
    whose values next to 1 fp16 cannot tell apart) keep their dtype."""
    params = {name for name, _ in module.named_parameters()}
    return {name: (value.half() if name in params and value.is_floating_point() else value)
            .detach().contiguous().cpu() for name, value in module.state_dict().items()}


def _write_pipeline(source: Path, target: Path) -> None:
    from safetensors.torch import save_file

    from models.unclip_pipeline import COMPONENTS, UnCLIPPipeline

    pipeline = UnCLIPPipeline.load(source)
    target.mkdir(parents=True)
    shutil.copyfile(source / "config.json", target / "config.json")
    for name in COMPONENTS:
        save_file(half_parameters(getattr(pipeline, name)), str(target / f"{name}.safetensors"))


def _write_evaluator(uri: str, target: Path) -> None:
    from safetensors.torch import save

    from orchestration.train.tasks.base import load_portable, read_portable_config

    _, clip = load_portable(uri)
    target.mkdir()
    (target / "config.json").write_text(json.dumps(read_portable_config(uri), indent=2))
    (target / "weights.safetensors").write_bytes(save(half_parameters(clip)))


def _eval_config_yaml(config: Config, data_uri: str) -> str:
    """The config minus what belongs to the machine that trained it: the dataset recipe at
    `data_uri`, local Ray, a local SQLite MLflow, the evaluator filled in on load."""
    raw = yaml.safe_load(dump_yaml(config))
    raw["data"]["uri"] = data_uri
    raw["data"].pop("embeddings_uri", None)
    raw["storage_root"] = "runs"
    raw["ray"] = {}
    raw["mlflow"]["tracking_uri"] = "sqlite:///mlflow.db"
    raw["eval"]["evaluator"] = {"uri": EVALUATOR_DIR}
    return yaml.safe_dump(raw, sort_keys=False)


def _source_lineage(model_uri: str, tracking_uri: str) -> dict:
    """Registered name/version and the version's lineage and metric tags, when registered."""
    from orchestration.registry.registry import _connect, _get_version, model_version

    if is_release(model_uri):  # re-released (e.g. with a better evaluator): same source
        earlier = read_release(model_uri)
        return earlier["source"] | {"re_released_from": {
            "created_utc": earlier["created_utc"], "git_commit": earlier["git_commit"],
            "evaluator": earlier["evaluator"]["identity"],
            "metrics": {k: v for k, v in earlier["eval"]["metrics"].items()
                        if isinstance(v, int | float) and not k.endswith(("_lo", "_hi"))}}}
    lineage: dict = {"model_uri": model_uri}
    if not model_uri.startswith("models:"):
        return lineage
    client = _connect(tracking_uri)
    name, version = model_version(client, model_uri)
    tags = _get_version(client, name, version).tags
    lineage.update(registered_model=name, version=version,
                   tags={k: v for k, v in sorted(tags.items())
                         if k.startswith(("lineage.", "metric.", "gate.", "best_"))})
    return lineage


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def write_release(model_uri: str, config: Config, out: Path, *, data_uri: str,
                  overwrite: bool = False, log=print) -> dict:
    """Write the release folder `out` for `model_uri` (evaluated with `config`'s dataset and
    evaluator first, so its numbers are the release's own); returns release.json's content."""
    import tempfile

    from orchestration.evaluate.evaluation import evaluate_model
    from orchestration.registry.registry import resolve_model_uri

    out = out.expanduser().absolute()
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    source_evaluator = _evaluator_to_ship(config)
    with tempfile.TemporaryDirectory(prefix="unclip-release-") as tmp:
        source = resolve_model_uri(model_uri, tracking_uri=config.mlflow.tracking_uri,
                                   dst_dir=Path(tmp) / "model")
        _write_pipeline(source, partial)
    _write_evaluator(source_evaluator.uri, partial / EVALUATOR_DIR)
    (partial / EVAL_CONFIG_FILE).write_text(_eval_config_yaml(config, data_uri))
    log(f"[release] fp16 weights written; evaluating the release itself ({partial})")
    eval_config = release_config(partial, [f"data.uri={config.data.uri}"])
    report = evaluate_model(str(partial), eval_config, partial / "eval", log=log)
    release = _release_record(model_uri, config, report, source_evaluator.identity)
    (partial / RELEASE_FILE).write_text(json.dumps(release, indent=2))
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    log(f"[release] {out}: {sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.1f}"
        " MB")
    return release


def _evaluator_to_ship(config: Config):
    """The reference evaluator the release's numbers are made with: it ships beside them."""
    from data_pipelines.storage import resolve
    from orchestration.evaluate.evaluator import evaluator_uri, load_evaluator

    if not resolve(evaluator_uri(config)).join("weights.safetensors").exists():
        raise ConfigError(f"no reference evaluator at {evaluator_uri(config)}: a release ships "
                          "the evaluator its numbers were made with; run `unclip eval` with this "
                          "config first (it trains the dataset's evaluator once) or set "
                          "eval.evaluator.uri")
    return load_evaluator(evaluator_uri(config))


def _release_record(model_uri: str, config: Config, report, evaluator_trained_as: str) -> dict:
    """release.json: metrics, lineage, evaluator identity, dataset manifest hash, commit."""
    from data_pipelines.shards import manifest_hash

    return {
        "format": FORMAT,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": _source_lineage(model_uri, config.mlflow.tracking_uri),
        "git_commit": _git_commit(),
        "dataset": {"manifest_hash": manifest_hash(config.data.uri),
                    "shapes": config.data.shapes.model_dump(mode="json")},
        "evaluator": {"identity": report.evaluator, "trained_as": evaluator_trained_as},
        "eval": {"captions_sha": report.captions_sha, "seed": report.seed,
                 "metrics": report.metrics},
    }


def compare_with_release(directory: str | Path, config: Config, report) -> str:
    """The re-check: each headline metric now and as released, and whether the dataset and
    evaluator are the ones the release was scored with (else the numbers do not compare)."""
    from data_pipelines.shards import manifest_hash

    released = read_release(directory)
    lines = []
    expected = released["dataset"]["manifest_hash"]
    actual = manifest_hash(config.data.uri)
    if actual != expected:
        lines.append(f"note: dataset {config.data.uri} (manifest {actual[:12]}) is not the one "
                     f"the release was scored on ({expected[:12]}): not comparable. Remove it "
                     f"to rebuild it from {EVAL_CONFIG_FILE}'s recipe.")
    if report.evaluator != released["evaluator"]["identity"]:
        lines.append(f"note: evaluator {report.evaluator} is not the release's "
                     f"({released['evaluator']['identity']}): not comparable")
    before = released["eval"]["metrics"]
    lines.append(f"{'metric':32s} {'now':>10s} {'released':>10s}")
    for name, value in report.metrics.items():
        if name in before and not name.endswith(("_lo", "_hi", "_seconds")):
            lines.append(f"{name:32s} {value:10.4g} {before[name]:10.4g}")
    return "\n".join(lines)

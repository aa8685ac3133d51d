"""GPU check: CLIP and the decoder through the real training loop (Ray Train + DeepSpeed,
NCCL, one worker, bf16) at ZeRO-2 and ZeRO-3, with samples/s, MFU and peak GPU memory.

Run it through benchmarks/gpu_check.sh, which installs the project first. Per ZeRO stage it
writes a config (cluster-gpu's models, ViT-B/32 CLIP and the 64x64 decoder, on a shapes
dataset rendered locally at 64 px), validates it with the project's loader, and trains CLIP
then the decoder for `--steps` steps with `unclip`'s own `run_stage`. Figures per stage:
- samples/s: median of the loop's logged windows (MLflow `samples_per_s`), the first skipped;
- MFU: FLOPs of one step (counted on the meta device by `models.flops`; the frozen CLIP
  that embeds the decoder's images is not counted) x steps/s / the card's dense bf16 peak;
- peak GPU memory: nvidia-smi's `memory.used` during the stage minus the level before it
  (so it includes the worker's CUDA context and allocator cache), and the worker's own
  `torch.cuda.max_memory_allocated` when the loop logs it (`gpu_max_memory_gib`).
Outputs: <out>/gpu_check.json, <out>/gpu_check.md and the configs in <out>/configs/.

    python benchmarks/gpu_check.py [--out DIR] [--steps 60] [--zero 2 3]
        [--peak-tflops T] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

STAGES = ("clip", "decoder")


def check_config(work: Path, zero: int, steps: int, cpus: int) -> dict:
    """One ZeRO stage's config: configs/cluster-gpu.yaml's models on one GPU, local data."""
    stage = {"steps": steps, "log_every": 10, "checkpoint_every": steps}
    return {
        "run_name": f"gpu-check-zero{zero}",
        "storage_root": str(work / "runs"),
        "data": {"uri": str(work / "shapes"), "build_shapes_if_missing": True,
                 "shapes": {"train_size": 4096, "test_size": 256, "image_size": 64,
                            "samples_per_shard": 256},
                 "preprocess": {"image_size": 64, "context_length": 32}},
        "scaling": {"num_workers": 1, "use_gpu": True, "cpus_per_worker": cpus},
        "deepspeed": {"zero_stage": zero, "precision": "bf16"},
        "clip": {"preset": "ViT-B-32", "overrides": {"vision_image_size": 64,
                                                     "vision_patch_size": 8},
                 "batch_size": 256, **stage},
        "decoder": {"preset": "cluster-64", "batch_size": 32, **stage},
        "sampling": {"sampler": "ddim", "decoder_steps": 10},  # the final evaluation's grid
        "mlflow": {"tracking_uri": f"sqlite:///{work}/mlflow.db", "experiment": "gpu-check",
                   "registered_model": "gpu-check"},
    }


def write_configs(out: Path, work: Path, zeros: list[int], steps: int) -> dict:
    """{ZeRO stage: config} written as YAML files and loaded back with the project's own
    loader, which raises a ConfigError naming the key of any mistake."""
    from orchestration.config import load_config

    cpus = max(1, min(8, (os.cpu_count() or 2) // 2))  # the rest decode data (Ray Data)
    configs = {}
    for zero in zeros:
        path = out / "configs" / f"gpu-check-zero{zero}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(check_config(work, zero, steps, cpus), sort_keys=False))
        configs[zero] = load_config(str(path))
    return configs


def step_flops(config, stage: str) -> int:
    """FLOPs of one forward + backward at the configured batch, counted without computing."""
    from mfu import stage_model_and_loss

    from models.flops import training_step_flops

    model, loss_fn = stage_model_and_loss(config, stage, device="meta")
    return training_step_flops(model, loss_fn)


def gpu_name() -> str:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         check=True, capture_output=True, text=True).stdout
    return out.strip().splitlines()[0]


def peak_tflops(name: str, given: float | None) -> float | None:
    """--peak-tflops, else the table's dense bf16 peak for this card (models.flops)."""
    from models.flops import peak_bf16_flops

    if given:
        return given
    peak = peak_bf16_flops(name)
    return peak / 1e12 if peak else None


class MemorySampler:
    """Peak of nvidia-smi's memory.used (MiB, GPU 0) while running; the driver touches no
    CUDA, so what rises above the level at start is the stage's worker."""

    def __init__(self, interval_ms: int = 200):
        self.command = ["nvidia-smi", "--id=0", "--query-gpu=memory.used",
                        "--format=csv,noheader,nounits", f"-lms={interval_ms}"]
        self.samples: list[float] = []

    def __enter__(self) -> MemorySampler:
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.strip():
                self.samples.append(float(line))

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.reader.join(timeout=5)

    def peak_gib(self) -> float:
        return (max(self.samples) - self.samples[0]) / 1024 if self.samples else float("nan")


def stage_metrics(config, run_id: str) -> dict:
    """Medians of the loop's logged windows, the first (warm-up) skipped."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(config.mlflow.tracking_uri)

    def median(key: str) -> float | None:
        values = [m.value for m in sorted(client.get_metric_history(run_id, key),
                                          key=lambda m: m.step)]
        return statistics.median(values[1:] or values) if values else None

    return {key: median(key) for key in ("samples_per_s", "step_time_s",
                                         "data_wait_fraction", "gpu_max_memory_gib")}


def run_stage_measured(config, stage: str, peak: float | None) -> dict:
    from orchestration.train.training_job import run_stage

    flops = step_flops(config, stage)
    with MemorySampler() as memory:
        start = time.monotonic()
        result = run_stage(config, stage, log=print)
        seconds = time.monotonic() - start
    metrics = stage_metrics(config, result.run_id)
    batch = config.stage(stage).batch_size
    achieved = flops * metrics["samples_per_s"] / batch
    return {"stage": stage, "zero_stage": config.deepspeed.zero_stage, "batch": batch,
            "samples_per_s": metrics["samples_per_s"], "step_time_s": metrics["step_time_s"],
            "data_wait_fraction": metrics["data_wait_fraction"],
            "tflop_per_step": flops / 1e12, "achieved_tflops": achieved / 1e12,
            "mfu": achieved / (peak * 1e12) if peak else None,
            "gpu_memory_used_gib": memory.peak_gib(),
            "gpu_max_allocated_gib": metrics["gpu_max_memory_gib"],
            "stage_wall_s": seconds, "mlflow_run": result.run_id}


def markdown(report: dict) -> str:
    def cell(value, digits=3):
        return "-" if value is None else f"{value:.{digits}g}" if isinstance(value, float) \
            else str(value)

    lines = [f"GPU check on {report['gpu']} (bf16 peak {cell(report['peak_tflops'])} TFLOP/s), "
             f"{report['date']}, {report['steps']} steps per stage, {report['wall_s']:.0f} s",
             "", "| stage | ZeRO | batch | samples/s | data wait | TFLOP/step | TFLOP/s | MFU "
             "| GPU mem used (GiB) | max allocated (GiB) |", "|" + "---|" * 10]
    for row in report["rows"]:
        lines.append(f"| {row['stage']} | {row['zero_stage']} | {row['batch']} | "
                     f"{cell(row['samples_per_s'], 4)} | {cell(row['data_wait_fraction'], 2)} | "
                     f"{cell(row['tflop_per_step'])} | {cell(row['achieved_tflops'])} | "
                     f"{cell(row['mfu'], 2)} | {cell(row['gpu_memory_used_gib'])} | "
                     f"{cell(row['gpu_max_allocated_gib'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_check_out", help="output folder")
    parser.add_argument("--steps", type=int, default=60, help="training steps per stage")
    parser.add_argument("--zero", type=int, nargs="+", default=[2, 3], choices=[0, 1, 2, 3])
    parser.add_argument("--peak-tflops", type=float,
                        help="the card's dense bf16 peak, if its name is not in the table")
    parser.add_argument("--dry-run", action="store_true",
                        help="write and validate the configs and count FLOPs; no CUDA")
    args = parser.parse_args()
    out = Path(args.out).absolute()
    # data and checkpoints (GBs) go to a temporary folder; a dry run creates nothing there
    work = out / "work" if args.dry_run else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    configs = write_configs(out, work, args.zero, args.steps)
    flops = {stage: step_flops(configs[args.zero[0]], stage) / 1e12 for stage in STAGES}
    print(json.dumps({"tflop_per_step": {k: round(v, 2) for k, v in flops.items()}}))
    if args.dry_run:
        print(f"dry run: {len(configs)} configs written to {out / 'configs'} and validated")
        return
    name = gpu_name()
    report = {"gpu": name, "peak_tflops": peak_tflops(name, args.peak_tflops),
              "date": time.strftime("%Y-%m-%d %H:%M"), "steps": args.steps,
              "command": " ".join(sys.argv), "rows": []}
    start = time.monotonic()
    for config in configs.values():
        for stage in STAGES:  # CLIP first: the decoder embeds its images with this CLIP
            report["rows"].append(run_stage_measured(config, stage, report["peak_tflops"]))
            report["wall_s"] = time.monotonic() - start
            # written after every stage, so a run cut short still leaves its results
            (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
            (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()

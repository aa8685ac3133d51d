"""Model-state bytes and peak memory per rank at ZeRO stages 0-3, with 2 and 4 workers.

The model is open_clip's ViT-B/32 (149M parameters: large enough that model state, not
activations or libraries, dominates a rank's memory) trained through the project's own loop
(`TrainLoop`: DeepSpeed engine, EMA, checkpoint) for `--steps` steps of batch 2 at 32 px,
patch 8. Each configuration starts `--workers` fresh processes joined in a gloo group (as
Ray Train would start them, without Ray: memory is then the loop's alone). Per rank:
- model-state bytes: parameters, gradients, optimizer state and EMA, counted from the
  tensors the rank holds during its first optimizer step (`engine_setup.model_state_bytes`);
- peak RSS (VmHWM) after the first step, i.e. set-up plus one step, and at the end of the run,
  which adds the checkpoint and, on rank 0, the gathered EMA model it exports.
Rajbhandari et al. (2020, sec. 5.1) give the ideal per-rank model state for Adam in fp32:
16 bytes per parameter at stage 0 (+4 for our EMA), falling with the world size N as
stages 1, 2 and 3 partition the optimizer state, then gradients, then the parameters.

    python benchmarks/zero_memory.py [--workers 2 4] [--stages 0 1 2 3] [--offload]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

OVERRIDES = ["clip.preset=ViT-B-32", "clip.overrides={vision_image_size: 32, "
             "vision_patch_size: 8}", "data.preprocess.image_size=32", "clip.batch_size=2",
             "clip.log_every=1", "scaling.torch_threads=1"]


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def columns(config, count: int) -> dict[str, np.ndarray]:
    """Random images with shapes-style captions, as Ray Data's preprocessing yields them."""
    from data_pipelines.streaming import tokenize

    rng = np.random.default_rng(0)
    size = config.data.preprocess.image_size
    captions = [f"a {c} circle" for c in rng.choice(["red", "green", "blue"], count)]
    return {"key": np.array([f"k{i}" for i in range(count)], dtype=object),
            "caption": np.array(captions, dtype=object),
            "image": rng.standard_normal((count, 3, size, size)).astype(np.float32),
            "tokens": tokenize(captions, config.data.preprocess.context_length)}


def rank_main(rank: int, world: int, port: int, args: dict, queue) -> None:
    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        import torch
        import torch.distributed as dist

        from orchestration.config import load_config
        from orchestration.stages import task_class
        from orchestration.train.loop_session import LocalSession
        from orchestration.train.train_loop import TrainLoop, WorkerSpec

        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        imported = peak_rss_bytes()
        root = Path(args["root"])
        config = load_config("tiny", [
            f"storage_root={root}/runs", f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db",
            *OVERRIDES, f"clip.steps={args['steps']}", f"clip.checkpoint_every={args['steps']}",
            f"deepspeed.zero_stage={args['zero']}",
            f"deepspeed.offload_optimizer={str(args['offload']).lower()}"])
        data = {"train": columns(config, 8 * world), "test": columns(config, 8)}

        class RankSession(LocalSession):
            def report(self, metrics, checkpoint_dir=None):
                self.reports.append(dict(metrics))
                if checkpoint_dir and rank == 0:
                    self.checkpoint_bytes = sum(
                        p.stat().st_size for p in Path(checkpoint_dir).rglob("*") if p.is_file())

        session = RankSession(data, root / "ckpt")
        session.rank, session.world_size = rank, world
        spec = WorkerSpec(config=config, task=task_class("clip"), run_id=None,
                          train_samples=8 * world)
        loop = TrainLoop(spec, session)
        set_up = peak_rss_bytes()
        params = sum(getattr(p, "ds_numel", p.numel()) for p in loop.engine.module.parameters())
        after_step = {}
        original = loop.train_step

        def first_step(batches):
            original(batches)
            after_step.setdefault("rss", peak_rss_bytes())

        loop.train_step = first_step
        loop.run()
        queue.put((rank, {"params": params, "peak_rss_imports": imported,
                          "peak_rss_setup": set_up, "model_state_bytes": loop.model_state_bytes,
                          "peak_rss_first_step": after_step["rss"],
                          "peak_rss_end": peak_rss_bytes(),
                          "checkpoint_bytes": getattr(session, "checkpoint_bytes", None)}))
        dist.destroy_process_group()
    except BaseException:
        queue.put((rank, traceback.format_exc()))


def measure(world: int, zero: int, steps: int, offload: bool) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="zero-memory-") as root:
        args = {"root": root, "steps": steps, "zero": zero, "offload": offload}
        procs = [ctx.Process(target=rank_main, args=(r, world, port, args, queue))
                 for r in range(world)]
        for proc in procs:
            proc.start()
        results = dict(queue.get(timeout=1800) for _ in procs)
        for proc in procs:
            proc.join(timeout=120)
    for rank, got in results.items():
        if not isinstance(got, dict):
            raise RuntimeError(f"rank {rank} failed:\n{got}")
    return [results[r] for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--offload", action="store_true",
                        help="also run stage 3 with the optimizer offloaded (DeepSpeedCPUAdam)")
    args = parser.parse_args()
    gib = 2**30
    rows = []
    cases = [(w, z, False) for w in args.workers for z in args.stages]
    cases += [(w, 3, True) for w in args.workers] if args.offload else []
    for world, zero, offload in cases:
        start = time.monotonic()
        ranks = measure(world, zero, args.steps, offload)
        row = {"workers": world, "zero": zero, "offload_optimizer": offload,
               "params_m": round(ranks[0]["params"] / 1e6, 1),
               "model_state_gib_per_rank": [round(r["model_state_bytes"] / gib, 3)
                                            for r in ranks],
               "peak_rss_imports_gib": [round(r["peak_rss_imports"] / gib, 2) for r in ranks],
               "peak_rss_setup_gib": [round(r["peak_rss_setup"] / gib, 2) for r in ranks],
               "peak_rss_first_step_gib": [round(r["peak_rss_first_step"] / gib, 2)
                                           for r in ranks],
               "peak_rss_end_gib": [round(r["peak_rss_end"] / gib, 2) for r in ranks],
               "seconds": round(time.monotonic() - start)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = {r["workers"]: r for r in rows if r["zero"] == 0 and not r["offload_optimizer"]}
    for row in rows:
        if row["workers"] in base:
            ref = base[row["workers"]]
            row["state_ratio_vs_zero0"] = round(
                max(row["model_state_gib_per_rank"]) / max(ref["model_state_gib_per_rank"]), 3)
            row["rss_ratio_vs_zero0"] = round(
                max(row["peak_rss_first_step_gib"]) / max(ref["peak_rss_first_step_gib"]), 3)
    print(json.dumps({"date": time.strftime("%Y-%m-%d"),
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                      "results": rows}, indent=2))


if __name__ == "__main__":
    main()

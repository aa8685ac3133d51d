"""ZeRO-3 that shards, on 2 ranks: each holds a fraction of the model state, starts from the
ZeRO-0 weights, averages (EMA) and checkpoints only its own partitions and resumes from them.

Two processes over a gloo group, each running the training loop with a `LocalSession` of its
rank (no Ray cluster): DeepSpeed at world size 2 in about a minute."""

from __future__ import annotations

import os
import shutil
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from stage_fixtures import fast_config, image_columns

from orchestration.train.loop_session import LocalSession

WORLD = 2
STEPS = ["clip.batch_size=4", "clip.log_every=2", "clip.checkpoint_every=2"]


class RankSession(LocalSession):
    """One rank of a local multi-process run; all ranks write into the same checkpoint
    folder, as Ray Train's per-rank uploads do."""

    def __init__(self, data, checkpoint_root: Path, rank: int):
        super().__init__(data, checkpoint_root)
        self.rank, self.world_size = rank, WORLD

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir:
            target = self.checkpoint_root / f"checkpoint_{metrics['step']:06d}"
            shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)
            self.checkpoints.append(target)


def _loop(root: Path, data, rank: int, zero_stage: int, name: str, *extra: str,
          run_id: str | None = None, **spec_fields):
    from orchestration.stages import task_class
    from orchestration.train.train_loop import TrainLoop, WorkerSpec

    config = fast_config(root, f"deepspeed.zero_stage={zero_stage}", *STEPS, *extra)
    spec = WorkerSpec(config=config, task=task_class("clip"), run_id=run_id,
                      train_samples=len(data["train"]["key"]), **spec_fields)
    return TrainLoop(spec, RankSession(data, root / name, rank))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    """Names of the tensors that differ."""
    sb = b.state_dict()
    return [k for k, v in a.state_dict().items() if not torch.equal(v, sb[k])]


def _facts(rank: int, root: Path, run_id: str) -> dict:
    """What the test asserts, from this rank (rank 0 alone compares weights)."""
    from orchestration.train.tasks.base import load_portable

    base = fast_config(root)
    data = {"train": image_columns(base, "train", 32), "test": image_columns(base, "test", 8)}
    facts, initial = {}, {}
    for stage in (0, 1, 3):
        loop = _loop(root, data, rank, stage, f"z{stage}", "clip.steps=2",
                     run_id=run_id if stage == 3 else None)
        initial[stage] = loop.ema_model()  # the initial weights, gathered on rank 0
        loop.run()
        facts[f"bytes{stage}"] = loop.model_state_bytes
    portable0 = root / "z0/checkpoint_000002/portable"
    if rank == 0:
        facts["initial_differs"] = _same(initial[0], initial[3])
        facts["zero1_files"] = sorted(p.name for p in (root / "z1/checkpoint_000002").rglob("*"))

    # ZeRO-3 resumption from per-rank EMA partitions matches an uninterrupted run
    straight = _loop(root, data, rank, 3, "straight", "clip.steps=4",
                     "clip.optim.ema_decay=0.5")
    straight.run()
    with pytest.raises(RuntimeError, match="injected failure at step 3"):
        _loop(root, data, rank, 3, "resumed", "clip.steps=4", "clip.optim.ema_decay=0.5",
              fail_at_step=3).run()
    resumed = _loop(root, data, rank, 3, "resumed", "clip.steps=4",
                    "clip.optim.ema_decay=0.5")
    facts["resumed_from"] = resumed.state.step
    resumed.run()
    if rank == 0:
        _, a = load_portable(str(straight.session.checkpoints[-1] / "portable"))
        _, b = load_portable(str(resumed.session.checkpoints[-1] / "portable"))
        facts["resume_differs"] = [k for k, v in a.state_dict().items()
                                   if not torch.allclose(v, b.state_dict()[k], atol=1e-5)]
        facts["checkpoint_files"] = sorted(
            str(p.relative_to(straight.session.checkpoints[-1]))
            for p in straight.session.checkpoints[-1].rglob("*") if p.is_file())

    # fine-tuning under ZeRO-3 starts from the portable weights, scattered to the partitions
    tuned = _loop(root, data, rank, 3, "tuned", "clip.steps=2", init_from=str(portable0))
    start = tuned.ema_model()
    if rank == 0:
        facts["init_from_differs"] = _same(start, load_portable(str(portable0))[1])
    return facts


def _rank_main(rank: int, port: int, root: str, run_id: str, queue) -> None:
    import torch.distributed as dist

    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                          LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        queue.put((rank, _facts(rank, Path(root), run_id)))
    except BaseException:
        queue.put((rank, traceback.format_exc()))


def test_zero3_shards_model_state_starts_like_zero0_and_resumes_per_rank(tmp_path):
    from mlflow.tracking import MlflowClient

    tracking = f"sqlite:///{tmp_path}/mlflow.db"  # fast_config's
    client = MlflowClient(tracking)
    run_id = client.create_run(client.create_experiment("zero")).info.run_id
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(rank, port, str(tmp_path), run_id, queue))
             for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    facts = dict(queue.get(timeout=600) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    for rank, got in facts.items():
        assert isinstance(got, dict), f"rank {rank} failed:\n{got}"

    for rank in range(WORLD):  # parameters + gradients + optimizer state + EMA per rank
        assert facts[rank]["bytes3"] <= 0.6 * facts[rank]["bytes0"], facts[rank]
    logged = client.get_metric_history(run_id, "model_state_bytes_rank0")
    assert [m.value for m in logged] == [facts[0]["bytes3"]]
    assert facts[0]["initial_differs"] == []  # ZeRO-3 starts from the ZeRO-0 weights
    assert facts[0]["resumed_from"] == 2 and facts[0]["resume_differs"] == []
    files = facts[0]["checkpoint_files"]
    assert {"ema_rank0.pt", "ema_rank1.pt"} <= set(files) and "ema.pt" not in files
    assert [f for f in files if f.endswith("optim_states.pt")] == [
        f"engine/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(WORLD)]
    assert facts[0]["init_from_differs"] == []
    assert [f for f in facts[0]["zero1_files"] if f.endswith("optim_states.pt")] == [
        f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(WORLD)]
    assert facts[0]["bytes1"] < facts[0]["bytes0"]  # ZeRO-1: the optimizer state is split

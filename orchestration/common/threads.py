"""Torch's thread pools sized to the CPUs a process holds.

By default torch gives its intra-op pool one thread per core of the machine and its inter-op
pool as many again, whatever else runs there. When another process (a Ray worker, a replica,
Ray's own daemons) takes one of those cores, a parallel op waits for the thread that lost it.
A user saw `unclip generate` take 99.5 s with the defaults and 21.7 s with OMP_NUM_THREADS=1
on a busy 2-core machine; benchmarks/inference_threads.py could not reproduce that size of
gap (RESULTS.md, "Inference threads"), but a pool sized to what the process holds costs
nothing measurable and bounds the worst case.

The policy, in `set_torch_threads`: intra-op threads = the whole CPUs held (at least one);
one inter-op thread, since this project runs no inter-op parallel work (`torch.jit.fork`).
A Ray task or actor holds what Ray reserved for it; a process outside Ray's accounting (the
CLI, the pipeline driver) shares the machine, so it holds all its cores but one.
"""

from __future__ import annotations

import math
import os
import sys


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's or taskset's limit)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def ray_reserved_cpus() -> float | None:
    """CPUs Ray reserved for the current task or actor; None outside a Ray worker."""
    ray = sys.modules.get("ray")  # a process that never imported Ray is no Ray worker
    if ray is None or not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:
        return None  # a driver: it holds no reservation
    return context.get_assigned_resources().get("CPU", 0.0)


def held_cpus() -> float:
    """The CPUs this process holds: Ray's reservation in a Ray worker, otherwise all cores
    of the machine but one, left to whatever else runs there."""
    reserved = ray_reserved_cpus()
    return reserved if reserved is not None else available_cpus() - 1


def set_torch_threads(cpus: float | None = None) -> int:
    """Size torch's pools to `cpus` (default: `held_cpus()`); returns the intra-op count."""
    import torch

    threads = max(1, min(math.floor(held_cpus() if cpus is None else cpus), available_cpus()))
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # torch allows it once, before any inter-op work: an earlier call already did
    return threads


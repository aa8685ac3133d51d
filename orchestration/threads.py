"""Torch's thread pools sized to the CPUs a process holds.

By default torch gives its intra-op pool one thread per core of the machine and its inter-op
pool as many again, whatever else runs there. A parallel op finishes only when its slowest
thread does, so when another process (a Ray worker, a replica, Ray's own daemons) takes one
of those cores, every op waits for the thread that lost it, and the waiting threads spin on
the cores the rest need. On 2 cores, `unclip generate` took 4.6x as long with torch's
defaults as with one thread (benchmarks/RESULTS.md, "Inference threads").

The policy, in `set_torch_threads`: intra-op threads = the whole CPUs held (at least one);
one inter-op thread, since this project runs no inter-op parallel work (`torch.jit.fork`).
A Ray task or actor holds what Ray reserved for it; a process outside Ray's accounting (the
CLI, the pipeline driver) shares the machine, so it holds all its cores but one.

Importing this module is light (no torch, no Ray), so the CLI can use it at import time.
"""

from __future__ import annotations

import functools
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


def with_torch_threads(command):
    """`command` run with torch's pools sized to the CPUs the process holds (for CLI
    commands; the wrapper keeps the command's signature, so typer sees the same options)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        set_torch_threads()
        return command(*args, **kwargs)

    return wrapper

"""Connecting to Ray: the cluster named in the config, $RAY_ADDRESS, or a local instance;
and checking, right after connecting, that the config's workers fit that cluster at all."""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.data

from orchestration.common.quiet_logs import SETUP_HOOK, quiet_library_logs
from orchestration.config import Config, ConfigError

LOOPBACK = "127.0.0.1"
# Written by the cluster launcher (`ray up`) on the head node, where submitted jobs run: the
# cluster may add nodes (Ray Tune's own test for an autoscaling cluster).
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"


class ClusterTooSmall(ConfigError):
    """The config's Train workers can never be placed on the connected cluster: a config
    error the CLI prints as one line."""


def configure_ray_data() -> None:
    """Deterministic order (reproducible epochs, exact resumption by skipping consumed
    batches); our own progress lines replace Ray Data's per-operator progress bars."""
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def connect(config: Config | None = None) -> None:
    configure_ray_data()
    if ray.is_initialized():
        return
    handler = signal.getsignal(signal.SIGTERM)
    try:
        _init(config)
    finally:
        # ray.init replaces a SIGTERM handler the CLI set (the one that ends MLflow runs
        # KILLED) with its own, plus a native one that aborts the process 3 s later
        if callable(handler) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)


def _init(config: Config | None) -> None:
    address = (config.ray.address if config else None) or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    num_cpus = config.ray.num_cpus if config else None
    quiet_library_logs()
    # one machine is never drained or preempted: no watcher actor (and no error-level line
    # about its restart arguments); workers of a local instance inherit this environment
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    init_local(num_cpus=num_cpus, logging_level=logging.WARNING,
               runtime_env={"worker_process_setup_hook": SETUP_HOOK})


def init_local(*, runtime_env: dict | None = None, **init_kwargs) -> None:
    """A new local Ray instance whose workers find its state API.

    Train's placement-group cleaner (a detached actor that frees a stopped run's CPUs, e.g.
    a Tune trial stopped early) asks the state API whether the run's controller still
    lives. With no address it looks up "the current cluster" in /tmp/ray, which names the
    last cluster `ray start` or another session left there, not this instance: the lookup
    fails, the cleaner's thread dies and the placement group outlives the trial, holding
    CPUs that the next trial's data tasks then wait for. So the dashboard (which serves
    the state API) gets a known loopback port, and every worker is told it."""
    port = _free_loopback_port()
    env = {**(runtime_env or {}).get("env_vars", {}),
           "RAY_API_SERVER_ADDRESS": f"http://{LOOPBACK}:{port}"}
    ray.init(address="local", include_dashboard=True,
             dashboard_host=LOOPBACK,  # Ray's default too; said here so it stays so
             dashboard_port=port, runtime_env={**(runtime_env or {}), "env_vars": env},
             **init_kwargs)


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Capacity:
    """What a cluster can ever hold: its nodes' resources, each with how many such nodes
    there can be (None: no limit)."""

    nodes: list[tuple[dict[str, float], int | None]]
    source: str  # names the limit in messages

    def total(self, resource: str) -> float:
        amounts = [r.get(resource, 0.0) * (math.inf if n is None else n) for r, n in self.nodes
                   if r.get(resource, 0.0)]
        return sum(amounts)

    def workers_that_fit(self, per_worker: dict[str, float]) -> float:
        """Workers placeable one node at a time (a worker never spans nodes)."""
        fits = 0.0
        for resources, count in self.nodes:
            per_node = min(math.floor(resources.get(name, 0.0) / amount + 1e-9)
                           for name, amount in per_worker.items() if amount > 0)
            if per_node:
                fits += math.inf if count is None else per_node * count
        return fits

    def nodes_that_fit(self, per_worker: dict[str, float]) -> float:
        """Nodes that hold at least one worker (STRICT_SPREAD puts one on each)."""
        return sum(math.inf if count is None else count for resources, count in self.nodes
                   if all(resources.get(k, 0.0) + 1e-9 >= v for k, v in per_worker.items()))


def cluster_capacity() -> Capacity | None:
    """The connected cluster's capacity: the autoscaler's maximum when Ray knows it, else the
    nodes alive now. None for a launcher cluster whose maximum Ray does not report: its
    autoscaler may add nodes of a size not known here."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()  # set where the autoscaler reports its limits
    except Exception:  # a private API: absent or changed means "not known"
        config = None
    groups = list(config.node_group_configs) if config is not None else []
    if groups:
        return Capacity([(dict(g.resources), None if g.max_count == -1 else g.max_count)
                         for g in groups if g.max_count != 0],
                        "the Ray cluster at its autoscaling limit")
    if Path(LAUNCHER_CONFIG).expanduser().exists():
        return None
    alive = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    return Capacity([(dict(resources), 1) for resources in alive], "the Ray cluster")


def check_cluster_fits(config: Config, capacity: Capacity | None = None) -> None:
    """Raise ClusterTooSmall (one line naming the key and the fix) when `config.scaling` asks
    for Train workers the connected cluster can never place; Ray Train would otherwise wait
    for them forever. Call it right after `connect`, before datasets or runs are made."""
    capacity = capacity or cluster_capacity()
    if capacity is None:
        return
    scaling = config.scaling
    per_worker = {"CPU": scaling.cpus_per_worker, **({"GPU": 1.0} if scaling.use_gpu else {})}
    have = _describe(capacity)
    if scaling.use_gpu and not capacity.total("GPU"):
        raise ClusterTooSmall(
            f"scaling.use_gpu=true but {capacity.source} has no GPUs ({have}); set "
            "scaling.use_gpu=false or connect to a cluster with GPU nodes (ray.address)")
    workers, fits = scaling.num_workers, capacity.workers_that_fit(per_worker)
    if workers > fits:
        need = " + ".join(f"{amount:g} {name}" for name, amount in per_worker.items())
        raise ClusterTooSmall(
            f"scaling.num_workers={workers} workers of {need} each (scaling.cpus_per_worker"
            f"{', scaling.use_gpu' if scaling.use_gpu else ''}) do not fit {capacity.source}: "
            f"it can place at most {fits:g} ({have}); lower scaling.num_workers or "
            "scaling.cpus_per_worker, or add nodes")
    if scaling.placement_strategy == "STRICT_SPREAD":
        nodes = capacity.nodes_that_fit(per_worker)
        if workers > nodes:
            raise ClusterTooSmall(
                f"scaling.placement_strategy=STRICT_SPREAD puts each of the {workers} workers "
                f"on its own node, but {capacity.source} has {nodes:g} node(s) that can hold "
                "one; set scaling.placement_strategy=PACK or SPREAD, or lower "
                "scaling.num_workers")


def _describe(capacity: Capacity) -> str:
    parts = []
    for name in ("CPU", "GPU"):
        total = capacity.total(name)
        parts.append(f"{'unbounded' if total == math.inf else f'{total:g}'} {name}")
    count = sum(math.inf if n is None else n for _, n in capacity.nodes)
    nodes = "unbounded" if count == math.inf else f"{count:g}"
    return f"{', '.join(parts)} on {nodes} node(s)"

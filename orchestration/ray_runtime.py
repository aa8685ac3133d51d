"""Connecting to Ray: the cluster named in the config, $RAY_ADDRESS, or a local instance."""

from __future__ import annotations

import logging
import os

import ray
import ray.data

from orchestration.config import Config
from orchestration.quiet_logs import SETUP_HOOK, quiet_library_logs


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
    address = (config.ray.address if config else None) or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    num_cpus = config.ray.num_cpus if config else None
    quiet_library_logs()
    # one machine is never drained or preempted: no watcher actor (and no error-level line
    # about its restart arguments); workers of a local instance inherit this environment
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # keep the dashboard: Ray's state API needs it, and Train's placement-group cleaner
    # uses that API to free a stopped run's CPUs (without it a stopped Tune trial's
    # placement group can outlive the trial)
    ray.init(address="local", num_cpus=num_cpus, logging_level=logging.WARNING,
             runtime_env={"worker_process_setup_hook": SETUP_HOOK})

"""Connecting to Ray: the cluster named in the config, $RAY_ADDRESS, or a local instance."""

from __future__ import annotations

import logging
import os

import ray

from orchestration.config import Config


def connect(config: Config | None = None) -> None:
    if ray.is_initialized():
        return
    address = (config.ray.address if config else None) or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    num_cpus = config.ray.num_cpus if config else None
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)

"""Library log lines that are not the user's business, filtered in the process that makes
them: the driver calls `quiet_library_logs` itself, and every Ray worker runs it at start
(`worker_process_setup_hook`), so the console keeps our lines and real warnings.
"""

from __future__ import annotations

import logging
import os
import warnings

# logger -> the lowest level still shown
_QUIETER = {
    "ray.train.v2._internal.execution.storage": logging.WARNING,  # "Checkpoint created at"
    "ray.data._internal.progress": logging.ERROR,  # "Progress bars disabled" (we log our own)
    # "Dataset ... execution finished": each worker opens a stream per epoch
    "ray.data._internal.execution.streaming_executor": logging.WARNING,
    "torch.utils.cpp_extension": logging.ERROR,  # "No CUDA runtime" while loading CPU ops
}


def quiet_library_logs() -> None:
    for name, level in _QUIETER.items():
        logging.getLogger(name).setLevel(level)
    # Ray Train names this module's logger by its file path, not its module name
    logging.getLogger(_ray_file("train/v2/_internal/execution/context.py")).setLevel(
        logging.WARNING)  # "Reporting training result N: TrainingReport(...)" per report
    # Ray Train's own use of a Ray Data option Ray deprecated: nothing for the user to change
    warnings.filterwarnings("ignore", message=".*ExecutionOptions.exclude_resources")
    if not _has_nvidia_device():
        # naming the accelerator stops DeepSpeed's "Setting accelerator to CPU" warning
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _ray_file(relative: str) -> str:
    import ray

    return os.path.join(os.path.dirname(ray.__file__), relative)


def _has_nvidia_device() -> bool:
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


SETUP_HOOK = f"{__name__}.quiet_library_logs"

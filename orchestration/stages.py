"""The list of training stages, in training order: each name maps to its task class.

This is the one place that names the stages. It imports nothing heavy, so the CLI and the
config check can name stages at once; a task's module (torch, open_clip) loads on first use.
A new stage is one task module (see `orchestration.train.tasks.base.Task`) plus one entry here, or
`register_task(MyTask)` from the caller's own code.
"""

from __future__ import annotations

import importlib

# name -> "module:Class"; the order is the training order (a stage's `requires` come first)
_BUILTIN = {
    "clip": "orchestration.train.tasks.clip:ClipTask",
    "prior": "orchestration.train.tasks.prior:PriorTask",
    "decoder": "orchestration.train.tasks.decoder:DecoderTask",
}
STAGES: tuple[str, ...] = tuple(_BUILTIN)  # the components of the text-to-image pipeline
_registered: dict[str, type] = {}


class UnknownStage(ValueError):
    pass


def register_task(task_cls: type) -> type:
    """Add a stage defined outside this package (usable as a class decorator)."""
    if task_cls.name in _BUILTIN:
        raise ValueError(f"stage {task_cls.name!r} is built in; choose another name")
    _registered[task_cls.name] = task_cls
    return task_cls


def unregister_task(name: str) -> None:
    _registered.pop(name, None)


def stage_names() -> tuple[str, ...]:
    return STAGES + tuple(_registered)


def task_class(name: str) -> type:
    if name in _registered:
        return _registered[name]
    if name not in _BUILTIN:
        raise UnknownStage(f"unknown stage {name!r}; choose one of {', '.join(stage_names())}")
    module, _, cls = _BUILTIN[name].partition(":")
    return getattr(importlib.import_module(module), cls)

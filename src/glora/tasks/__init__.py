"""Task families by name, as the aggregation rules are: one module each, one registry line.

A run's ``task`` names a GLUE task (``sst2``, ``cola``, ...: the ``glue`` family), a family
(``superni``; ``classification`` and ``instructions`` for the user's own data, read from
``--dataset``), or any name registered here. Adding a task: a class implementing
:class:`~glora.tasks.base.FederatedTask` (built from the run config) and subclassing
:class:`~glora.tasks.base.TaskFamily`, and one line in :data:`FAMILIES` (a class, or
"module:Class" to import it only when used). The round loop, the config checks and the
Flower app ask the family; none of them branches on a task's name.
"""

from __future__ import annotations

import importlib

# Not `glue`: the package's own submodule glora.tasks.glue takes that name once imported.
from glora.data.glue import get_task as glue_task
from glora.data.glue import task_names as glue_task_names
from glora.tasks.base import FederatedTask, TaskFamily

FAMILIES: dict[str, str | type] = {
    "glue": "glora.tasks.glue:GlueTask",
    "superni": "glora.tasks.superni:SuperNITask",
    "classification": "glora.tasks.classification:DatasetClassificationTask",
    "instructions": "glora.tasks.instructions:InstructionTask",
}


def family_name(task: str) -> str:
    """The family of a task name: itself where it names a family, "glue" for a GLUE task.
    ValueError listing the choices for an unknown name."""
    if task in FAMILIES and task != "glue":
        return task
    try:
        glue_task(task)
    except ValueError:
        families = ", ".join(f for f in FAMILIES if f != "glue")
        raise ValueError(
            f"unknown task {task!r}: give a GLUE task ({', '.join(glue_task_names())}), {families}, "
            "or --dataset PATH for your own data"
        ) from None
    return "glue"


def task_class(task: str) -> type[TaskFamily]:
    """The class that builds ``task``."""
    return family_class(family_name(task))


def family_class(family: str) -> type[TaskFamily]:
    """The class registered for ``family`` in :data:`FAMILIES`, imported on first use."""
    entry = FAMILIES[family]
    if isinstance(entry, str):
        module, _, name = entry.partition(":")
        entry = getattr(importlib.import_module(module), name)
    return entry


def build_task(cfg) -> FederatedTask:
    """The task of a run config, data and model loaded."""
    return task_class(cfg.task)(cfg)


__all__ = ["FAMILIES", "FederatedTask", "TaskFamily", "build_task", "family_class", "family_name", "task_class"]

"""Every task by name, gathered from the task modules' ``TASKS`` tables."""

from __future__ import annotations

import importlib

from .tasks.base import Task

#: Modules of ``qwen_vl.eval.tasks`` that define tasks.
TASK_MODULES = ("caption", "general_vqa", "text_vqa", "grounding", "multiple_choice", "mme", "synthetic")


def all_tasks() -> dict[str, type[Task]]:
    """Task name -> class, over every task module."""
    table: dict[str, type[Task]] = {}
    for module in TASK_MODULES:
        table.update(importlib.import_module(f"{__package__}.tasks.{module}").TASKS)
    return dict(sorted(table.items()))


def get_task(name: str) -> Task:
    """A new instance of task ``name``; an unknown name lists the known ones."""
    table = all_tasks()
    if name not in table:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(table)}")
    return table[name]()

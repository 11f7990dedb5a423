"""Example messages in English and Chinese, about a shapes-world picture made at start.

The picture is one scene of the synthetic shapes world the bundled demo model learnt
from (``qwen_vl.data``); the questions are that world's question templates and the
official grounding prompts, so the demo model knows how to answer them.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from ..data.scenes import render_scene, sample_scene
from ..grounding import chat_grounding_prompt

#: The scene of the example picture: a yellow circle, a red star and hexagon, a blue and a green
#: rectangle, and the word EGG.
EXAMPLE_SEED = 133
EXAMPLE_NAME = "shapes-example.png"

PROMPTS: tuple[str, ...] = (
    "Describe the picture.",
    "How many shapes are there?",
    chat_grounding_prompt("the yellow circle"),
    "Find every shape.",
    "描述这张图片。",
    "图中有几个形状？",
    chat_grounding_prompt("黄色的圆形", language="zh"),
    "找出图中所有的形状。",
)


def example_picture(folder: str | Path) -> Path:
    """Render the example scene into ``folder`` (the demo's own folder) and return its path."""
    path = Path(folder) / EXAMPLE_NAME
    render_scene(sample_scene(random.Random(EXAMPLE_SEED))).save(path)
    return path


def example_messages(picture: str | Path) -> list[list[dict[str, Any]]]:
    """One ``gr.Examples`` row per prompt: a message of the prompt with ``picture`` attached."""
    return [[{"text": prompt, "files": [str(picture)]}] for prompt in PROMPTS]

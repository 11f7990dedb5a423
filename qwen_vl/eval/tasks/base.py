"""What every evaluation task provides: items read from the benchmark's local files,
the prompt of an item, the prediction read from a response, and the scores.

The runner (``qwen_vl.eval.runner``) knows nothing of any benchmark: it asks the
task for items and prompts, generates (or, for likelihood tasks, scores the
options by the model's loss), and hands the predictions back to the task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ...finetune.records import DataError

PromptStyle = Literal["base", "chat"]
PROMPT_STYLES: tuple[str, ...] = ("base", "chat")


@dataclass
class EvalItem:
    """One question of a benchmark.

    ``images`` are absolute paths in prompt order; ``target`` is the ground truth
    in whatever form the task's scorer takes (answers, box, references, letter);
    ``meta`` carries what scoring needs besides (image size, subtask, question
    type, answer ids); ``source`` is ``file:line`` for messages.
    """

    id: str
    images: list[str]
    question: str
    target: Any
    options: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""


@dataclass
class ReadResult:
    """Items read from the data files, and the bad records (file, line, field) left out."""

    items: list[EvalItem]
    errors: list[DataError] = field(default_factory=list)


class Task(ABC):
    """One benchmark (or one split of one).

    ``likelihood`` tasks are scored without generation: each option of an item is
    appended to the prompt and the option with the lowest average token loss wins
    (``option_texts`` gives the continuations); their prediction, as ``score``
    receives it, is the index of the winning option (first on ties).
    """

    name: str = ""
    family: str = ""
    metric: str = ""  # the headline metric's key in ``score``'s result
    max_new_tokens: int = 32
    likelihood: bool = False

    @abstractmethod
    def read(self, data: Path, image_root: Path | None = None, skip_bad: bool = False) -> ReadResult:
        """Items of the benchmark's file(s) at ``data``. Image paths resolve against
        ``image_root`` (default: as the benchmark's layout places them). A bad record
        raises ``DataError`` naming file, line and field, or is skipped (and returned
        in ``errors``) with ``skip_bad``."""

    @abstractmethod
    def prompt(self, item: EvalItem, style: PromptStyle) -> str:
        """The prompt text: for ``"base"`` the raw text fed to the model as is (with
        ``<img>path</img>`` tags); for ``"chat"`` the user query that the runner wraps in
        the chat template (``make_context``), with images as ``Picture N: <img>path</img>``."""

    def postprocess(self, response: str, item: EvalItem) -> Any:
        """The prediction read from the model's response (default: the stripped text)."""
        return response.strip()

    def option_texts(self, item: EvalItem, style: PromptStyle) -> list[str]:
        """Likelihood tasks: the continuation scored for each option."""
        raise NotImplementedError(f"task {self.name} is not a likelihood task")

    @abstractmethod
    def score(self, items: Sequence[EvalItem], predictions: Sequence[Any], mode: str = "canonical") -> dict[str, Any]:
        """Metrics (percentages where the benchmark reports them) with ``self.metric``
        among the keys; ``mode`` is ``"canonical"`` or ``"qwen"`` (Qwen-VL's scripts)."""

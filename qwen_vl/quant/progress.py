"""The quantization progress line: one update per quantized layer, with its error and the time left."""

from __future__ import annotations

from typing import TextIO

from ..finetune.progress import ProgressLine


class LayerProgress(ProgressLine):
    """``[####....] 12/224 layers | transformer.h.1.mlp.w2 | err 3.1e-02 | 40s elapsed, 2m10s left``."""

    def __init__(self, total_layers: int, stream: TextIO | None = None, quiet: bool = False) -> None:
        super().__init__(total_layers, stream, quiet)
        self.done = 0

    def line(self, name: str, error: float) -> str:
        return f"{self.bar(self.done)} {self.done}/{self.total} layers | {name} | err {error:.3e} | {self.timing(self.done)}"

    def update(self, name: str, error: float) -> None:
        self.done += 1
        if not self.quiet:
            self.show(self.line(name, error))

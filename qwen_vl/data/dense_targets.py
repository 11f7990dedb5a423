"""Per-cell labels of a shapes-world scene, for supervising a vision tower directly.

The picture is seen by the model as a ``grid x grid`` raster of cells (the resampler's
queries: 16 x 16 for Qwen-VL). Every cell gets, at its centre:

* ``colour``: 1 + index into ``COLOURS`` of the object whose box holds the centre, 0 for none;
* ``shape``: 1 + index into ``SHAPES`` likewise;
* ``box``: that object's box as fractions of the picture ``(x1, y1, x2, y2)``, zeros for none;
* ``chars``: at ``samples`` points spread across the cell's middle row, the letter of a word
  drawn there (1-26 for A-Z, 0 for none), from the font's own advance widths;
* ``count``: how many objects the picture holds (at every cell), and, at an object's cells,
  how many objects have its colour and how many its shape (0 elsewhere): counting is a
  property of the whole picture, and written at every cell it is there wherever one looks.

Cells are taken in the stretched square the model sees (pictures are resized to a square),
so cell (i, j) covers the fractions ``[j/grid, (j+1)/grid)`` across and ``[i/grid, (i+1)/grid)``
down of the original picture.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

from .scenes import COLOURS, MAX_OBJECTS, SHAPES, Scene, font_for

COLOUR_CLASSES = 1 + len(COLOURS)
SHAPE_CLASSES = 1 + len(SHAPES)
CHAR_CLASSES = 27  # none + A-Z
COUNT_CLASSES = MAX_OBJECTS + 1  # 0-6
COUNTS = ("all", "same_colour", "same_shape")  # the count labels of a cell, in order
_COLOUR_INDEX = {name: k + 1 for k, name in enumerate(COLOURS)}
_SHAPE_INDEX = {name: k + 1 for k, name in enumerate(SHAPES)}


@dataclass(frozen=True)
class CellTargets:
    """Labels of one picture: ``colour``, ``shape`` (G, G) long; ``box`` (G, G, 4) float;
    ``chars`` (G, G, samples) long; ``count`` (G, G, 3) long (see ``COUNTS``)."""

    colour: torch.Tensor
    shape: torch.Tensor
    box: torch.Tensor
    chars: torch.Tensor
    count: torch.Tensor

    @classmethod
    def join(
        cls, parts: Sequence[CellTargets], combine: Callable[[list[torch.Tensor]], torch.Tensor] = torch.stack
    ) -> CellTargets:
        """``parts`` joined field by field: ``torch.stack`` (a new batch dimension) or ``torch.cat``."""
        return cls(*(combine([getattr(p, f.name) for p in parts]) for f in fields(cls)))


def cells_within(lo: float, hi: float, grid: int, scale: float = 1.0) -> list[int]:
    """Indices of the ``grid`` cells along one side whose centres, ``(k + 0.5) / grid * scale``,
    lie in ``[lo, hi)`` (``scale``: the side's length in the units of ``lo`` and ``hi``)."""
    return [k for k in range(grid) if lo <= (k + 0.5) / grid * scale < hi]


def cell_targets(scene: Scene, grid: int = 16, samples: int = 4) -> CellTargets:
    """The per-cell labels of ``scene`` on a ``grid x grid`` raster (see the module docs)."""
    W, H = scene.width, scene.height
    colour = torch.zeros(grid, grid, dtype=torch.long)
    shape = torch.zeros(grid, grid, dtype=torch.long)
    box = torch.zeros(grid, grid, 4)
    chars = torch.zeros(grid, grid, samples, dtype=torch.long)
    count = torch.zeros(grid, grid, len(COUNTS), dtype=torch.long)
    count[..., 0] = min(len(scene.objects), MAX_OBJECTS)
    colours = Counter(o.colour for o in scene.objects)
    shapes = Counter(o.shape for o in scene.objects)
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        same = torch.tensor([min(colours[obj.colour], MAX_OBJECTS), min(shapes[obj.shape], MAX_OBJECTS)])
        for i in cells_within(y1, y2, grid, H):
            for j in cells_within(x1, x2, grid, W):
                colour[i, j] = _COLOUR_INDEX[obj.colour]
                shape[i, j] = _SHAPE_INDEX[obj.shape]
                box[i, j] = torch.tensor([x1 / W, y1 / H, x2 / W, y2 / H])
                count[i, j, 1:] = same
    for word in scene.words:
        font = font_for(word.font_size)
        edges = [word.origin[0] + font.getlength(word.text[:k]) for k in range(len(word.text) + 1)]
        _, y1, _, y2 = word.box
        for i in cells_within(y1, y2, grid, H):
            for j in range(grid):
                for s in range(samples):
                    x = (j + (s + 0.5) / samples) / grid * W
                    for k, letter in enumerate(word.text):
                        if edges[k] <= x < edges[k + 1]:
                            chars[i, j, s] = ord(letter) - ord("A") + 1
                            break
    return CellTargets(colour, shape, box, chars, count)

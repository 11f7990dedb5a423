"""Per-cell labels of shapes-world scenes agree with the drawn pixels and the words' letters."""

from __future__ import annotations

import random

import numpy as np
import pytest

from qwen_vl.data.dense_targets import cell_targets
from qwen_vl.data.scenes import COLOURS, SHAPES, render_scene, sample_scene

GRID = 16


def _centre_pixel(image: np.ndarray, i: int, j: int) -> tuple[int, int, int]:
    h, w, _ = image.shape
    y = min(int((i + 0.5) / GRID * h), h - 1)
    x = min(int((j + 0.5) / GRID * w), w - 1)
    return tuple(int(v) for v in image[y, x])


@pytest.mark.parametrize("seed", range(6))
def test_shape_pixels_carry_their_objects_labels(seed):
    scene = sample_scene(random.Random(seed))
    image = np.asarray(render_scene(scene).convert("RGB"))
    t = cell_targets(scene, GRID)
    names = list(COLOURS)
    hits = 0
    for i in range(GRID):
        for j in range(GRID):
            rgb = _centre_pixel(image, i, j)
            if rgb in COLOURS.values():  # a shape pixel: its cell is labelled with that colour
                assert names[int(t.colour[i, j]) - 1] == next(n for n, c in COLOURS.items() if c == rgb)
                hits += 1
            if t.colour[i, j] == 0:
                assert t.shape[i, j] == 0 and float(t.box[i, j].abs().sum()) == 0.0
    assert hits > 0 or all(o.size == "small" for o in scene.objects)
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        expected = [x1 / scene.width, y1 / scene.height, x2 / scene.width, y2 / scene.height]
        for i in range(GRID):
            for j in range(GRID):
                x, y = (j + 0.5) / GRID * scene.width, (i + 0.5) / GRID * scene.height
                if x1 <= x < x2 and y1 <= y < y2:
                    assert names[int(t.colour[i, j]) - 1] == obj.colour
                    assert SHAPES[int(t.shape[i, j]) - 1] == obj.shape
                    assert np.allclose(t.box[i, j].tolist(), expected)
                    same_colour = sum(o.colour == obj.colour for o in scene.objects)
                    same_shape = sum(o.shape == obj.shape for o in scene.objects)
                    assert t.count[i, j].tolist() == [len(scene.objects), same_colour, same_shape]
    assert (t.count[..., 0] == len(scene.objects)).all()  # the picture's count is at every cell
    assert (t.count[..., 1:][t.colour == 0] == 0).all()


def _is_subsequence(short: str, long: str) -> bool:
    it = iter(long)
    return all(c in it for c in short)


def test_word_letters_read_left_to_right():
    rng = random.Random(0)
    scene = next(s for s in (sample_scene(rng, words=True) for _ in range(50)) if s.words)
    t = cell_targets(scene, GRID, samples=4)
    word = scene.words[0]
    _, y1, _, y2 = word.box
    middle = min(int((y1 + y2) / 2 / scene.height * GRID), GRID - 1)
    samples = [int(c) for c in t.chars[middle].flatten() if c > 0]
    read = "".join(chr(ord("A") + c - 1) for k, c in enumerate(samples) if k == 0 or c != samples[k - 1])
    assert len(read) >= len(word.text) // 2
    assert _is_subsequence(read, word.text)

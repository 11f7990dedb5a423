"""Where in the pictures each answer's facts are: the ``regions`` of a synthetic answer.

The regions follow the format ``qwen_vl.finetune.regions`` reads (picture number from 1, box on
the 0-1000 scale, ``start``: the answer character from which a region applies). Answers that
name several things in order (captions, "find every shape", reading words) get one region per
thing, starting where the answer turns to it; the others get the regions of the objects they
are about, all from the start. Answers about nothing in the picture ("no", a count of 0) get none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .conversations import Turn, object_name, reading_order, word_order
from .scenes import Scene, SceneObject, normalised_box


def _region(scene: Scene, box: Sequence[int], picture: int = 1, start: int = 0) -> dict[str, Any]:
    region: dict[str, Any] = {"image": picture, "box": list(normalised_box(box, scene.width, scene.height))}
    if start:
        region["start"] = start
    return region


def _in_order(turn: Turn, scene: Scene, lang: str) -> list[dict[str, Any]]:
    """One region per object or word, from where the answer turns to it."""
    answer, regions, pos = turn.answer, [], 0
    if turn.kind == "ocr":
        for word in word_order(scene.words):
            found = answer.find(word.text, pos)
            if found < 0:
                raise ValueError(f"answer {answer!r} does not read {word.text!r}")
            regions.append(_region(scene, word.box, start=pos if regions else 0))
            pos = found + len(word.text)
        return regions
    for i in reading_order(scene.objects):
        obj = scene.objects[i]
        name = object_name(obj.colour, obj.shape, lang)
        found = answer.find(name, pos)
        if found < 0:
            raise ValueError(f"answer {answer!r} does not name {name!r}")
        start = pos if turn.kind == "caption" else answer.rfind("<ref>", 0, found)
        regions.append(_region(scene, obj.box, start=start if regions else 0))
        pos = found + len(name)
    return regions


def _matching(objects: Sequence[SceneObject], **wanted: str) -> list[SceneObject]:
    return [o for o in objects if all(getattr(o, key) == value for key, value in wanted.items())]


def answer_regions(turn: Turn, scenes: Sequence[Scene], lang: str) -> list[dict[str, Any]]:
    """The regions of ``turn``'s answer about ``scenes`` (two for a difference: before, after)."""
    scene, target = scenes[0], turn.target
    if turn.kind in ("caption", "find_all", "ocr"):
        return _in_order(turn, scene, lang)
    if turn.kind == "count":
        wanted = {} if target["of"] == "all" else {target["of"]: target[target["of"]]}
        return [_region(scene, o.box) for o in _matching(scene.objects, **wanted)]
    if turn.kind == "yesno":
        found = _matching(scene.objects, colour=target["colour"], shape=target["shape"])
        return [_region(scene, o.box) for o in found]
    if turn.kind == "difference":
        kind, index = target["type"], target["object"]
        pictures = {"added": (2,), "removed": (1,)}.get(kind, (1, 2))
        return [_region(scenes[p - 1], scenes[p - 1].objects[index].box, picture=p) for p in pictures]
    return [_region(scene, scene.objects[target["object"]].box)]

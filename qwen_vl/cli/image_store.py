"""The images of one conversation, loaded once and looked up by the text of their ``<img>`` span."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from ..images import ImagePolicy, load_image

_IMAGE_SPAN = re.compile(r"<img>(.*?)</img>", re.S)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def image_refs(text: str) -> list[str]:
    """The sources written in ``text``'s ``<img>...</img>`` spans, in order."""
    return _IMAGE_SPAN.findall(text)


class ImageStore:
    """Loaded images by reference string.

    Images named by the user (``--image``, ``:image``) are opened without the
    root restriction; paths and URLs written in prompt text go through ``policy``.
    """

    def __init__(self, policy: ImagePolicy | None = None) -> None:
        self.policy = policy if policy is not None else ImagePolicy()
        self.images: dict[str, Image.Image] = {}

    def add_named(self, source: str) -> str:
        """Load an image the user named directly; returns the reference to write in the prompt."""
        if source not in self.images:
            if _URL.match(source):
                policy, target = replace(self.policy, allow_urls=True, allowed_hosts=()), source
            else:
                path = Path(source).expanduser()
                policy, target = replace(self.policy, allowed_roots=(str(path.resolve().parent),)), str(path)
            self.images[source] = load_image(target, policy)
        return source

    def resolve(self, text: str) -> None:
        """Load every image ``text`` names that is not loaded yet, under the policy.

        Raises ``ImageLoadError`` (a ValueError) naming the first refused source.
        """
        for ref in image_refs(text):
            if ref not in self.images:
                self.images[ref] = load_image(ref, self.policy)

    def mapping(self) -> dict[str, Any]:
        """Reference -> image, as ``GenerationRequest.images`` takes it."""
        return dict(self.images)

    def clear(self) -> None:
        self.images.clear()

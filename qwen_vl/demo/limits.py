"""What one demo accepts: uploads, messages, answer length and the queue."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..images import ImagePolicy


@dataclass
class DemoLimits:
    """Caps applied to every user of the web demo (the server's ``ServerLimits`` ideas)."""

    max_images: int = 8  # images in one conversation (every turn's prompt holds them all)
    max_image_bytes: int = 20 * 1024 * 1024  # one uploaded file
    max_image_pixels: int = 16_000_000  # width x height of one image
    max_text_chars: int = 4000  # one typed message
    max_new_tokens: int = 2048  # the top of the "max new tokens" setting
    max_queue: int = 64  # events waiting for a worker; beyond it the queue is full

    def validate(self) -> DemoLimits:
        """Raise ValueError naming the first limit below 1; return ``self``."""
        names = ("max_images", "max_image_bytes", "max_image_pixels", "max_text_chars", "max_new_tokens", "max_queue")
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        return self

    def policy(self, root: str | Path) -> ImagePolicy:
        """The image policy of the demo: files under ``root`` only, no URLs, these caps."""
        return ImagePolicy(
            allowed_roots=(str(Path(root).resolve()),),
            allow_urls=False,
            max_bytes=self.max_image_bytes,
            max_pixels=self.max_image_pixels,
        )

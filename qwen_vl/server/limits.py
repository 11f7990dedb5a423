"""What one server accepts: request sizes, images, tokens and the queue."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..images import ImagePolicy


@dataclass
class ServerLimits:
    """Caps applied to every request. ``max_prompt_tokens`` None: what the engine's cache holds."""

    max_images: int = 8  # images in one request (all messages together)
    max_image_bytes: int = 20 * 1024 * 1024  # one encoded image
    max_image_pixels: int = 16_000_000  # width x height of one image
    max_prompt_tokens: int | None = None
    max_tokens: int = 2048  # largest max_tokens a request may ask for
    max_n: int = 8  # choices per request
    max_queue: int = 64  # requests waiting for a row; beyond it: 429
    max_body_bytes: int = 64 * 1024 * 1024  # request body

    def validate(self) -> ServerLimits:
        for name in ("max_images", "max_image_bytes", "max_image_pixels", "max_tokens", "max_n", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be at least 0, got {self.max_queue}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be at least 1, got {self.max_prompt_tokens}")
        return self


@dataclass
class ImageAccess:
    """Where image_url parts may come from: data URIs always; local paths only under
    ``allow_roots`` (none: no paths); http(s) URLs only with ``allow_url`` (public addresses,
    ``allowed_hosts`` if given)."""

    allow_roots: list[str] = field(default_factory=list)
    allow_url: bool = False
    allowed_hosts: list[str] = field(default_factory=list)
    allow_private_addresses: bool = False  # for tests against a local image server only

    def policy(self, limits: ServerLimits) -> ImagePolicy:
        return ImagePolicy(
            allowed_roots=tuple(str(Path(r).expanduser().resolve()) for r in self.allow_roots),
            allow_urls=self.allow_url or bool(self.allowed_hosts),
            allowed_hosts=tuple(self.allowed_hosts),
            max_bytes=limits.max_image_bytes,
            max_pixels=limits.max_image_pixels,
            allow_private_addresses=self.allow_private_addresses,
        )

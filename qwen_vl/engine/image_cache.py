"""Cache of vision-tower outputs keyed by the image's content.

The key is a hash of the preprocessed pixels, so the same picture given as a path,
bytes or a PIL image, repeated in one prompt, in a later turn or in another
request, is encoded once.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch


def pixel_key(pixels: torch.Tensor) -> str:
    """Content hash of one preprocessed image (3, S, S)."""
    data = pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


class ImageFeatureCache:
    """Least-recently-used map from image content to features (256, C)."""

    def __init__(self, capacity: int = 64) -> None:
        if capacity < 1:
            raise ValueError(f"image cache capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._store: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def encode(self, pixels: list[torch.Tensor], encoder: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Features (N, 256, C) for ``pixels``, running ``encoder`` on unseen images only."""
        keys = [pixel_key(p) for p in pixels]
        missing: dict[str, torch.Tensor] = {}
        for key, p in zip(keys, pixels):
            if key in self._store:
                self.hits += 1
                self._store.move_to_end(key)
            elif key in missing:
                self.hits += 1
            else:
                self.misses += 1
                missing[key] = p
        if missing:
            features = encoder(torch.stack(list(missing.values())))  # (M, 256, C)
            for key, f in zip(missing, features):
                self._store[key] = f.detach()
        result = torch.stack([self._store[k] for k in keys])
        while len(self._store) > self.capacity:
            self._store.popitem(last=False)
        return result

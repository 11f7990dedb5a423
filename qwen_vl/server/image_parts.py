"""Opening the ``image_url`` parts of a request under the server's image policy.

``data:image/...;base64,`` URIs are always accepted; http(s) URLs only when the
server allows URLs (public addresses only); local paths (plain or ``file://``) only
under the server's allowed roots. A refusal names the part, never the server's own paths
(its allowed roots). Each image is written in the prompt as a short
reference derived from its pixels, so the same picture in a later turn gives the
same tokens (and the engine reuses that turn's keys/values).
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse

from PIL import Image

from ..images import ImageLoadError, ImagePolicy, load_image
from .errors import APIError, invalid
from .limits import ServerLimits
from .messages import ImagePart

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def image_ref(image: Image.Image) -> str:
    """A short name for ``image`` that depends only on its mode, size and pixels."""
    digest = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return f"image-{digest.hexdigest()[:24]}"


def _source(part: ImagePart, policy: ImagePolicy) -> str:
    """The string to hand ``load_image``, or a 400 when the server does not take this kind."""
    url = part.url.strip()
    match = _SCHEME.match(url)
    scheme = match.group(1).lower() if match else ""
    if scheme == "data":
        return url
    if scheme in ("http", "https"):
        if not policy.allow_urls:
            raise invalid(part.param, "image URLs are not allowed on this server (send a data: URI)", "image_refused")
        return url
    if scheme == "file":
        url = urllib.parse.unquote(urllib.parse.urlparse(url).path)
    elif scheme and len(scheme) > 1:  # a one-letter "scheme" is a Windows drive
        raise invalid(part.param, f"unsupported URL scheme {scheme!r} (use data:, http or https)", "image_refused")
    if not policy.allowed_roots:
        raise invalid(
            part.param, "local image paths are not allowed on this server (send a data: URI)", "image_refused"
        )
    return url


def load_parts(parts: list[ImagePart], policy: ImagePolicy, limits: ServerLimits) -> list[tuple[str, Image.Image]]:
    """``(ref, image)`` for every part, in order; 400 naming the part for any refusal
    (with the reason's public wording, which names no local path)."""
    if len(parts) > limits.max_images:
        raise APIError(
            400,
            f"messages: {len(parts)} images in the request, at most {limits.max_images} allowed",
            param="messages",
            code="too_many_images",
        )
    loaded = []
    for part in parts:
        source = _source(part, policy)
        try:
            image = load_image(source, policy)
        except ImageLoadError as e:
            raise invalid(part.param, e.public_reason, "image_refused") from None
        loaded.append((image_ref(image), image))
    return loaded

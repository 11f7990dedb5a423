"""Image sources, the policy that guards them, and the reference preprocessing.

``load_image`` opens local paths (only under allowed roots), http(s) URLs (only
when enabled, only to public addresses), raw or base64 bytes, PIL images and
numpy arrays, and raises ``ImageLoadError`` for anything the ``ImagePolicy``
refuses. ``image_transform`` turns a PIL image into the normalised pixel tensor
the vision tower expects, exactly as the reference does.
"""

from __future__ import annotations

import base64
import binascii
import functools
import http.client
import io
import ipaddress
import os
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM", "ICO", "TGA")

_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_BASE64_CHARS = re.compile(r"[A-Za-z0-9+/\s]+")
_DATA_URI = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),", re.IGNORECASE)

#: Longest local path opened, in characters (Linux's PATH_MAX). Resolving a path costs a
#: system call per component, so longer strings are refused before any.
MAX_PATH_CHARS = 4096

#: Leading bytes of common image formats, to name a refused format in errors.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"qoif", "QOI"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG2000"),
    (b"\xff\x4f\xff\x51", "JPEG2000"),
    (b"%!PS", "EPS"),
    (b"%PDF", "PDF"),
    (b"P1", "PPM"),
    (b"P2", "PPM"),
    (b"P3", "PPM"),
    (b"P4", "PPM"),
    (b"P5", "PPM"),
    (b"P6", "PPM"),
)


class ImageLoadError(ValueError):
    """An image source could not be loaded or was refused by the ``ImagePolicy``.

    ``reason`` says why. ``public_reason`` says it without the local paths it may name
    (the allowed roots, a resolved path), for a caller that answers a remote client;
    it is ``reason`` when that names none.
    """

    def __init__(self, source: str, reason: str, public_reason: str | None = None) -> None:
        super().__init__(f"cannot load image {source}: {reason}")
        self.source = source
        self.reason = reason
        self.public_reason = reason if public_reason is None else public_reason


@dataclass(frozen=True)
class ImagePolicy:
    """What ``load_image`` may open.

    ``allowed_roots``: directories local paths must resolve into (symlinks
    followed); ``None`` means the current working directory at the time of the
    check. ``allow_urls``: fetch http(s) URLs at all. ``allowed_hosts``: if not
    empty, the only host names URLs (and their redirects) may name; matched
    exactly, case-insensitively. ``max_bytes`` / ``max_pixels``: caps on the
    encoded size and on width x height. ``allowed_formats``: Pillow format names
    that may be decoded. ``allow_private_addresses`` lets URLs reach loopback and
    private addresses: meant only for tests against a local server.
    """

    allowed_roots: tuple[str | os.PathLike[str], ...] | None = None
    allow_urls: bool = False
    allowed_hosts: tuple[str, ...] = ()
    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 10.0
    max_pixels: int = 64_000_000
    allowed_formats: tuple[str, ...] = DEFAULT_FORMATS
    max_redirects: int = 5
    allow_private_addresses: bool = False

    def roots(self) -> list[Path]:
        """The allowed roots, resolved now."""
        roots = self.allowed_roots if self.allowed_roots is not None else (os.getcwd(),)
        if isinstance(roots, (str, os.PathLike)):
            roots = (roots,)
        return [Path(r).resolve() for r in roots]

    def host_allowed(self, host: str) -> bool:
        """Whether ``host`` passes ``allowed_hosts`` (exact, case-insensitive, trailing dot ignored)."""
        if not self.allowed_hosts:
            return True
        hosts = (self.allowed_hosts,) if isinstance(self.allowed_hosts, str) else self.allowed_hosts
        return host.rstrip(".").lower() in {h.rstrip(".").lower() for h in hosts}


def describe(source: Any, limit: int = 120) -> str:
    """A short printable name for a source, for error messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, np.ndarray):
        return f"<numpy array {tuple(source.shape)} {source.dtype}>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.size[0]}x{source.size[1]}>"
    if isinstance(source, str):
        if source[:5].lower() == "data:":
            return f"<data URI, {len(source)} chars>"
        text = source if len(source) <= limit else source[: limit - 3] + "..."
        return repr(text)
    if isinstance(source, os.PathLike):
        return repr(os.fspath(source))
    return f"<{type(source).__name__}>"


def sniff_format(data: bytes) -> str | None:
    """The image format named by ``data``'s leading bytes, if recognised."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    return None


def decode_image(data: bytes, source: str, policy: ImagePolicy) -> Image.Image:
    """Decode encoded image bytes under ``policy`` (size, format and pixel caps)."""
    if len(data) > policy.max_bytes:
        raise ImageLoadError(source, f"too large: more than {policy.max_bytes} bytes")
    if not data:
        raise ImageLoadError(source, "empty data")
    formats = tuple(f.upper() for f in policy.allowed_formats)
    sniffed = sniff_format(data)
    if sniffed is not None and sniffed not in formats:
        raise ImageLoadError(source, f"unsupported format {sniffed} (allowed: {', '.join(formats)})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=list(formats))
        except Image.DecompressionBombError as exc:
            raise ImageLoadError(source, f"too many pixels ({exc})") from None
        except Image.UnidentifiedImageError:
            reason = "corrupt or truncated file" if sniffed else "unsupported format or not an image"
            raise ImageLoadError(source, f"{reason} (allowed: {', '.join(formats)})") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageLoadError(source, f"corrupt or truncated file ({exc})") from None
        width, height = image.size
        if width * height > policy.max_pixels:
            raise ImageLoadError(source, f"too many pixels: {width}x{height} exceeds {policy.max_pixels}")
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
            raise ImageLoadError(source, f"corrupt or truncated file ({exc})") from None
    return image


def _check_pixels(image: Image.Image, source: str, policy: ImagePolicy) -> Image.Image:
    width, height = image.size
    if width * height > policy.max_pixels:
        raise ImageLoadError(source, f"too many pixels: {width}x{height} exceeds {policy.max_pixels}")
    return image


def resolve_local_path(path: str | os.PathLike[str], policy: ImagePolicy) -> Path:
    """``path`` resolved (relative to the CWD, symlinks followed); refused unless it
    lies under an allowed root."""
    source = describe(path)
    text = os.fspath(path)
    if len(text) > MAX_PATH_CHARS:
        raise ImageLoadError(source, f"path too long ({len(text)} characters, at most {MAX_PATH_CHARS})")
    try:
        resolved = (Path.cwd() / text).resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise ImageLoadError(source, f"cannot resolve path ({exc})", "cannot resolve path") from None
    roots = policy.roots()
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        where = ", ".join(str(r) for r in roots)
        raise ImageLoadError(source, f"outside allowed roots ({where})", "outside the allowed roots")
    return resolved


def read_local_file(path: str | os.PathLike[str], policy: ImagePolicy) -> bytes:
    """The bytes of a local file under an allowed root, at most ``max_bytes``; any
    failure of the file system (a name too long, no permission) is an ``ImageLoadError``."""
    source = describe(path)
    resolved = resolve_local_path(path, policy)
    try:
        if not resolved.exists():
            raise ImageLoadError(source, "not found")
        if not resolved.is_file():
            raise ImageLoadError(source, "not a regular file")
        with open(resolved, "rb") as f:
            data = f.read(policy.max_bytes + 1)
    except OSError as exc:
        raise ImageLoadError(source, f"cannot read file ({exc.strerror or type(exc).__name__})") from None
    if len(data) > policy.max_bytes:
        raise ImageLoadError(source, f"too large: more than {policy.max_bytes} bytes")
    return data


class _Refused(Exception):
    """A URL fetch step refused by the policy (raised inside urllib's handlers)."""


def address_problem(address: str) -> str | None:
    """Why an IP address may not be contacted (e.g. "loopback"), or None if public."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            candidates = [ip.ipv4_mapped]
        elif ip.sixtofour is not None:
            candidates.insert(0, ip.sixtofour)
    for candidate in candidates:
        for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
            if getattr(candidate, f"is_{kind}"):
                return kind.replace("_", "-")
        if not candidate.is_global:
            return "not globally routable"
    return None


def _check_url(url: str, policy: ImagePolicy) -> None:
    """Scheme, credentials and host allow-list checks of one URL (no DNS)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise _Refused(f"URL scheme {parts.scheme!r} is not allowed (only http, https)")
    if parts.username is not None or parts.password is not None:
        raise _Refused("credentials in URLs are not supported")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise _Refused("URL has no host")
    if not policy.host_allowed(host):
        raise _Refused(f"host {host!r} is not in allowed_hosts")


def _open_vetted_socket(host: str, port: int, timeout: float | None, policy: ImagePolicy) -> socket.socket:
    """Resolve ``host``, refuse non-public addresses, connect to a vetted one."""
    if not policy.host_allowed(host):
        raise _Refused(f"host {host!r} is not in allowed_hosts")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise _Refused(f"cannot resolve host {host!r} ({exc})") from None
    if not policy.allow_private_addresses:
        for *_, sockaddr in infos:
            problem = address_problem(sockaddr[0])
            if problem is not None:
                raise _Refused(f"refused address {sockaddr[0]} ({problem}) for host {host!r}")
    last_error: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            last_error = exc
    raise OSError(f"cannot connect to {host!r}: {last_error}")


class _VettedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, *, policy: ImagePolicy, **kwargs: Any) -> None:
        super().__init__(host, **kwargs)
        self._policy = policy

    def connect(self) -> None:
        self.sock = _open_vetted_socket(self.host, self.port, self.timeout, self._policy)


class _VettedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, *, policy: ImagePolicy, ssl_context: ssl.SSLContext, **kwargs: Any) -> None:
        super().__init__(host, context=ssl_context, **kwargs)
        self._policy = policy
        self._ssl_context = ssl_context

    def connect(self) -> None:
        sock = _open_vetted_socket(self.host, self.port, self.timeout, self._policy)
        self.sock = self._ssl_context.wrap_socket(sock, server_hostname=self.host)


class _VettedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: ImagePolicy) -> None:
        super().__init__()
        self._policy = policy

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_VettedHTTPConnection, policy=self._policy), req)


class _VettedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: ImagePolicy) -> None:
        super().__init__()
        self._policy = policy
        self._ssl = ssl.create_default_context()

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        connection = functools.partial(_VettedHTTPSConnection, policy=self._policy, ssl_context=self._ssl)
        return self.do_open(connection, req)


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Re-checks every redirect target and caps their number."""

    def __init__(self, policy: ImagePolicy) -> None:
        super().__init__()
        self._policy = policy
        self._count = 0
        # urllib's own loop limits stay above ours so that ours speaks first.
        self.max_redirections = self.max_repeats = policy.max_redirects + 1

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        self._count += 1
        try:
            if self._count > self._policy.max_redirects:
                raise _Refused(f"too many redirects (more than {self._policy.max_redirects})")
            try:
                _check_url(newurl, self._policy)
            except _Refused as exc:
                raise _Refused(f"redirect to {describe(newurl)} refused: {exc}") from None
        except _Refused:
            fp.close()
            raise
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_url(url: str, policy: ImagePolicy) -> bytes:
    """The body of an http(s) URL under ``policy``: public addresses only (checked
    at every connection, redirects included), at most ``max_bytes``, within
    ``timeout_s`` in total."""
    name = describe(url)
    if not policy.allow_urls:
        raise ImageLoadError(name, "URL fetching is disabled (enable it with ImagePolicy(allow_urls=True))")
    opener = urllib.request.OpenerDirector()
    for handler in (
        _VettedHTTPHandler(policy),
        _VettedHTTPSHandler(policy),
        _CheckedRedirects(policy),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.HTTPDefaultErrorHandler(),
    ):
        opener.add_handler(handler)
    deadline = time.monotonic() + policy.timeout_s
    try:
        _check_url(url, policy)
        request = urllib.request.Request(url, headers={"User-Agent": "qwen-vl", "Accept": "image/*"})
        with opener.open(request, timeout=policy.timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.strip().isdigit() and int(declared) > policy.max_bytes:
                raise _Refused(f"too large: {int(declared)} bytes declared, limit {policy.max_bytes}")
            body = bytearray()
            while len(body) <= policy.max_bytes:
                if time.monotonic() > deadline:
                    raise _Refused(f"timed out after {policy.timeout_s} s")
                chunk = response.read(min(65536, policy.max_bytes + 1 - len(body)))
                if not chunk:
                    break
                body += chunk
            if len(body) > policy.max_bytes:
                raise _Refused(f"too large: more than {policy.max_bytes} bytes")
            return bytes(body)
    except _Refused as exc:
        raise ImageLoadError(name, str(exc)) from None
    except urllib.error.HTTPError as exc:
        exc.close()
        raise ImageLoadError(name, f"HTTP error {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, _Refused):
            raise ImageLoadError(name, str(reason)) from None
        raise ImageLoadError(name, f"cannot fetch ({reason})") from None
    except TimeoutError:
        raise ImageLoadError(name, f"timed out after {policy.timeout_s} s") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise ImageLoadError(name, f"cannot fetch ({exc})") from None


def _decode_base64(text: str, source: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageLoadError(source, f"invalid base64 ({exc})") from None


def _is_base64_text(text: str) -> bool:
    """Whether ``text`` is base64 letters and whitespace, then at most two ``=`` and
    whitespace. Linear in ``len(text)``: the padding is split off from the end first, so
    the one pattern left is a single repeated character class, matched in one pass."""
    stripped = text.rstrip()
    padding = len(stripped) - len(stripped.rstrip("="))
    if padding > 2:
        return False
    body = stripped[: len(stripped) - padding] if padding else text
    return _BASE64_CHARS.fullmatch(body) is not None


def _looks_like_base64_image(text: str) -> bool:
    if len(text) < 64 or not _is_base64_text(text):
        return False
    try:
        head = base64.b64decode("".join(text[:64].split())[:64], validate=True)
    except (binascii.Error, ValueError):
        return False
    return sniff_format(head) is not None


def _data_uri_bytes(uri: str, source: str) -> bytes:
    match = _DATA_URI.match(uri)
    if match is None:
        raise ImageLoadError(source, "malformed data URI")
    mime = match.group("mime").strip().lower()
    params = [p.strip().lower() for p in match.group("params").split(";") if p.strip()]
    if mime and not mime.startswith("image/"):
        raise ImageLoadError(source, f"data URI media type {mime!r} is not an image")
    if "base64" not in params:
        raise ImageLoadError(source, "data URI is not base64-encoded")
    return _decode_base64(uri[match.end() :], source)


def _from_array(array: np.ndarray, source: str, policy: ImagePolicy) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageLoadError(source, "numpy images must be uint8")
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)):
        if array.shape[0] * array.shape[1] > policy.max_pixels:
            raise ImageLoadError(
                source, f"too many pixels: {array.shape[1]}x{array.shape[0]} exceeds {policy.max_pixels}"
            )
        mode = {2: "L", 3: "RGB", 4: "RGBA"}[array.ndim if array.ndim == 2 else array.shape[2]]
        return Image.fromarray(np.ascontiguousarray(array), mode=mode)
    raise ImageLoadError(source, f"numpy images must be HxW, HxWx3 or HxWx4, got shape {tuple(array.shape)}")


def load_image(source: Any, policy: ImagePolicy | None = None) -> Image.Image:
    """Open an image from a local path, an http(s) URL, raw bytes, a base64 string
    or ``data:image/...;base64,`` URI, a PIL image or a uint8 numpy array
    (HxW, HxWx3, HxWx4), as allowed by ``policy`` (default: ``ImagePolicy()``).

    The image keeps its own mode; ``image_transform`` converts it to RGB.
    Raises ``ImageLoadError`` naming the source and the reason on any refusal
    or failure.
    """
    policy = policy if policy is not None else ImagePolicy()
    name = describe(source)
    if isinstance(source, Image.Image):
        return _check_pixels(source, name, policy)
    if isinstance(source, np.ndarray):
        return _from_array(source, name, policy)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image(bytes(source), name, policy)
    if isinstance(source, os.PathLike):
        return decode_image(read_local_file(source, policy), name, policy)
    if not isinstance(source, str):
        raise ImageLoadError(name, "unsupported source type (use a path, URL, bytes, base64, PIL image or numpy array)")
    text = source.strip()
    if text[:5].lower() == "data:":
        return decode_image(_data_uri_bytes(text, name), name, policy)
    if _URL_SCHEME.match(text):
        return decode_image(fetch_url(text, policy), name, policy)
    if _looks_like_base64_image(text):
        return decode_image(_decode_base64(text, name), name, policy)
    return decode_image(read_local_file(source, policy), name, policy)


def image_transform(image: Image.Image, image_size: int) -> torch.Tensor:
    """Reference preprocessing: RGB (alpha and palette transparency dropped),
    PIL bicubic resize to ``image_size`` x ``image_size``, /255, then
    (x - mean) / std per channel. Returns float32 (3, S, S)."""
    rgb = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy())  # (S, S, 3)
    x = pixels.permute(2, 0, 1).to(torch.float32).div(255)  # (3, S, S)
    mean = torch.tensor(IMAGE_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


def preprocess_images(sources: Sequence[Any], image_size: int, policy: ImagePolicy | None = None) -> torch.Tensor:
    """Load and transform each source: (N, 3, image_size, image_size) float32."""
    if not sources:
        return torch.empty(0, 3, image_size, image_size)
    return torch.stack([image_transform(load_image(s, policy), image_size) for s in sources])

"""Image sources, the safety policy, and the reference preprocessing.

No test here touches any network address other than 127.0.0.1: refused URLs are
refused before any connection, and fetching is tested against a local server.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GOLDEN_DIR
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from qwen_vl import images as images_module
from qwen_vl.images import (
    IMAGE_MEAN,
    IMAGE_STD,
    ImageLoadError,
    ImagePolicy,
    address_problem,
    image_transform,
    load_image,
    preprocess_images,
)

ABS_TOL = 1e-6  # element values
REL_TOL = 1e-6  # sums, means, std


# ----- golden transform statistics ------------------------------------------------------


def _transform_cases() -> list[tuple[str, int, dict]]:
    """(id, image_size, record) for every image of every model case and of visual_only."""
    cases: list[tuple[str, int, dict]] = []
    model_path = GOLDEN_DIR / "model_cases.json"
    if model_path.is_file():
        data = json.loads(model_path.read_text(encoding="utf-8"))
        size = data["checkpoint_config"]["visual"]["image_size"]
        for case in data["cases"]:
            for i, image in enumerate(case.get("images", [])):
                cases.append((f"{case['id']}-{i}-{Path(image['path']).stem}", size, image))
    only_path = GOLDEN_DIR / "visual_only" / "cases.json"
    if only_path.is_file():
        data = json.loads(only_path.read_text(encoding="utf-8"))
        for image in data["images"]:
            cases.append((f"visual_only-{Path(image['path']).stem}", data["config"]["image_size"], image))
    return cases


TRANSFORM_CASES = _transform_cases()


def test_every_golden_image_is_covered(golden_dir):
    assert {Path(r["path"]).name for _, _, r in TRANSFORM_CASES} == {
        p.name for p in (golden_dir / "images").glob("*.png")
    }
    assert len(TRANSFORM_CASES) >= 18


@pytest.mark.parametrize(("size", "record"), [c[1:] for c in TRANSFORM_CASES], ids=[c[0] for c in TRANSFORM_CASES])
def test_transform_matches_golden_statistics(golden_dir, size, record):
    stats = record["transform"]
    image = load_image(golden_dir / record["path"], ImagePolicy(allowed_roots=(golden_dir,)))
    if "file_mode" in record:
        assert image.mode == record["file_mode"] and list(image.size) == record["file_size"]
    x = image_transform(image, size)
    assert x.dtype == torch.float32 and list(x.shape) == stats["shape"] == [3, size, size]
    flat = x.flatten()
    np.testing.assert_allclose(flat[:16].numpy(), stats["first16"], rtol=0, atol=ABS_TOL)
    np.testing.assert_allclose(flat[stats["sample_index"]].numpy(), stats["sample_values"], rtol=0, atol=ABS_TOL)
    assert abs(flat.min().item() - stats["min"]) <= ABS_TOL
    assert abs(flat.max().item() - stats["max"]) <= ABS_TOL
    wide = x.double()
    assert wide.sum().item() == pytest.approx(stats["sum"], rel=REL_TOL)
    assert wide.mean().item() == pytest.approx(stats["mean"], rel=REL_TOL, abs=ABS_TOL)
    assert wide.std().item() == pytest.approx(stats["std"], rel=REL_TOL)  # unbiased, as recorded
    np.testing.assert_allclose(wide.mean(dim=(1, 2)).numpy(), stats["channel_means"], rtol=REL_TOL, atol=ABS_TOL)


def test_transform_drops_alpha_without_compositing():
    rgba = Image.new("RGBA", (8, 8), (200, 100, 50, 0))
    x = image_transform(rgba, 8)
    expected = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(IMAGE_MEAN)) / torch.tensor(IMAGE_STD)
    torch.testing.assert_close(x[:, 3, 3], expected.float(), rtol=0, atol=1e-6)


def test_transform_resize_ignores_aspect_ratio():
    x = image_transform(Image.new("L", (300, 20), 255), 28)
    assert x.shape == (3, 28, 28)
    expected = ((1.0 - torch.tensor(IMAGE_MEAN)) / torch.tensor(IMAGE_STD)).float()
    torch.testing.assert_close(x[:, 10, 10], expected)


def test_preprocess_images_stacks(golden_dir):
    policy = ImagePolicy(allowed_roots=(golden_dir,))
    paths = [golden_dir / "images" / "noise_33x33.png", golden_dir / "images" / "palette_P_97x53.png"]
    batch = preprocess_images(paths, 56, policy)
    assert batch.shape == (2, 3, 56, 56)
    torch.testing.assert_close(batch[1], image_transform(Image.open(paths[1]), 56), rtol=0, atol=0)


# ----- helpers ---------------------------------------------------------------------


def png_bytes(size: tuple[int, int] = (20, 10), mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def png_with_dimensions(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose IHDR claims ``width`` x ``height``."""
    data = bytearray(png_bytes((4, 4)))
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes of header fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def refused(source, policy: ImagePolicy | None, reason: str, name: str | None = None) -> ImageLoadError:
    """Assert that loading fails with ``reason`` in the message, naming the source."""
    with pytest.raises(ImageLoadError) as info:
        load_image(source, policy)
    message = str(info.value)
    assert re.search(reason, message), message
    if name is not None:
        assert name in message, message
    assert isinstance(info.value, ValueError)
    return info.value


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "root"
    folder.mkdir()
    (folder / "ok.png").write_bytes(png_bytes())
    return folder


# ----- every source type --------------------------------------------------------------


def test_relative_path_resolves_against_cwd(golden_dir, monkeypatch):
    monkeypatch.chdir(golden_dir)
    image = load_image("images/palette_P_97x53.png")
    assert image.mode == "P" and image.size == (97, 53)


def test_path_objects_and_absolute_strings(root):
    policy = ImagePolicy(allowed_roots=(root,))
    a = load_image(root / "ok.png", policy)
    b = load_image(str(root / "ok.png"), policy)
    assert a.size == (20, 10) and np.array_equal(pixels(a), pixels(b))


def test_bytes_base64_and_data_uri_agree(root):
    raw = (root / "ok.png").read_bytes()
    reference = pixels(load_image(root / "ok.png", ImagePolicy(allowed_roots=(root,))))
    b64 = base64.b64encode(raw).decode()
    for source in (
        raw,
        bytearray(raw),
        memoryview(raw),
        b64,
        f"data:image/png;base64,{b64}",
        f"DATA:image/png;BASE64,{b64}",
    ):
        assert np.array_equal(pixels(load_image(source)), reference)


def test_pil_image_passes_through():
    image = Image.new("P", (5, 6))
    assert load_image(image) is image


@pytest.mark.parametrize(("shape", "mode"), [((6, 5), "L"), ((6, 5, 3), "RGB"), ((6, 5, 4), "RGBA")])
def test_numpy_arrays(shape, mode):
    array = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    image = load_image(array)
    assert image.mode == mode and image.size == (5, 6)
    assert np.array_equal(np.asarray(image), array)


def test_non_contiguous_numpy_array():
    array = np.random.default_rng(2).integers(0, 256, (8, 10, 3), dtype=np.uint8)[:, ::2]
    assert np.array_equal(np.asarray(load_image(array)), array)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"])
def test_default_formats_decode(fmt):
    image = Image.new("RGB", (9, 7), (10, 200, 30))
    assert load_image(encoded(image, fmt)).size == (9, 7)


def test_transform_of_loaded_bytes_equals_direct(golden_dir):
    path = golden_dir / "images" / "rgba_300x700.png"
    direct = image_transform(Image.open(path), 448)
    torch.testing.assert_close(image_transform(load_image(path.read_bytes()), 448), direct, rtol=0, atol=0)


# ----- local path refusals -------------------------------------------------------------


def test_outside_allowed_roots(tmp_path, root):
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes())
    refused(outside, ImagePolicy(allowed_roots=(root,)), "outside allowed roots", str(outside))


def test_dotdot_escape(tmp_path, root, monkeypatch):
    (tmp_path / "secret.png").write_bytes(png_bytes())
    monkeypatch.chdir(root)
    refused("../secret.png", None, "outside allowed roots", "../secret.png")
    refused(str(root / ".." / "secret.png"), ImagePolicy(allowed_roots=(root,)), "outside allowed roots")


def test_symlink_escape(tmp_path, root):
    (tmp_path / "secret.png").write_bytes(png_bytes())
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    (root / "dirlink").symlink_to(tmp_path, target_is_directory=True)
    policy = ImagePolicy(allowed_roots=(root,))
    refused(root / "link.png", policy, "outside allowed roots", "link.png")
    refused(root / "dirlink" / "secret.png", policy, "outside allowed roots", "secret.png")


def test_symlink_inside_root_is_fine(root):
    (root / "alias.png").symlink_to(root / "ok.png")
    assert load_image(root / "alias.png", ImagePolicy(allowed_roots=(root,))).size == (20, 10)


def test_default_root_is_cwd(tmp_path, root, monkeypatch):
    monkeypatch.chdir(root)
    assert load_image("ok.png").size == (20, 10)
    monkeypatch.chdir(tmp_path)
    assert load_image("root/ok.png").size == (20, 10)
    monkeypatch.chdir(root / "..")
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    refused(str(root / "ok.png"), None, "outside allowed roots")


def test_single_root_and_host_strings(root):
    assert load_image(root / "ok.png", ImagePolicy(allowed_roots=str(root))).size == (20, 10)
    assert ImagePolicy(allowed_hosts="example.com").host_allowed("EXAMPLE.com.")
    assert not ImagePolicy(allowed_hosts="example.com").host_allowed("e")


def test_not_found(root):
    refused(root / "missing.png", ImagePolicy(allowed_roots=(root,)), "not found", "missing.png")


def test_directory_is_not_an_image(root):
    (root / "dir.png").mkdir()
    refused(root / "dir.png", ImagePolicy(allowed_roots=(root,)), "not a regular file")


def test_file_system_errors_are_refusals(root):
    policy = ImagePolicy(allowed_roots=(root,))
    error = refused(str(root / ("x" * 300 + ".png")), policy, "cannot read file \\(File name too long\\)")
    assert str(root) not in error.public_reason
    refused(root / "ok.png" / "inner.png", policy, "not found")  # a file used as a folder


def test_overlong_paths_are_refused_before_resolving(root):
    policy = ImagePolicy(allowed_roots=(root,))
    refused(str(root / ("x" * 5000)), policy, "path too long")
    refused("a/" * 100_000, policy, "path too long")


def test_public_reason_names_no_local_path(tmp_path, root):
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes())
    error = refused(outside, ImagePolicy(allowed_roots=(root,)), "outside allowed roots", str(root))
    assert error.public_reason == "outside the allowed roots"
    assert refused(root / "missing.png", ImagePolicy(allowed_roots=(root,)), "not found").public_reason == "not found"


# ----- content refusals ----------------------------------------------------------------------


def test_too_many_bytes(root):
    size = (root / "ok.png").stat().st_size
    policy = ImagePolicy(allowed_roots=(root,), max_bytes=size - 1)
    refused(root / "ok.png", policy, "too large", "ok.png")
    refused((root / "ok.png").read_bytes(), policy, "too large", f"<{size} bytes>")
    assert load_image(root / "ok.png", ImagePolicy(allowed_roots=(root,), max_bytes=size)).size == (20, 10)


def test_too_many_pixels_crafted_header():
    bomb = png_with_dimensions(100_000, 100_000)  # 1e10 pixels claimed in 100-odd bytes
    assert len(bomb) < 200
    refused(bomb, None, "too many pixels")
    refused(png_with_dimensions(9000, 8000), None, "too many pixels")  # under PIL's own limit, over ours


def test_max_pixels_is_per_policy():
    data = png_bytes((40, 40))
    refused(data, ImagePolicy(max_pixels=1599), "too many pixels: 40x40")
    assert load_image(data, ImagePolicy(max_pixels=1600)).size == (40, 40)
    refused(np.zeros((40, 40), np.uint8), ImagePolicy(max_pixels=100), "too many pixels")
    refused(Image.new("L", (40, 40)), ImagePolicy(max_pixels=100), "too many pixels")


def test_disallowed_format():
    jpeg = encoded(Image.new("RGB", (8, 8)), "JPEG")
    refused(jpeg, ImagePolicy(allowed_formats=("PNG",)), "unsupported format JPEG", "bytes")
    ico = encoded(Image.new("RGB", (16, 16)), "ICO")
    refused(ico, ImagePolicy(allowed_formats=("PNG", "JPEG")), "unsupported format ICO")
    psd_like = b"8BPS" + b"\x00" * 60
    refused(psd_like, None, "unsupported format PSD")
    refused(b"just some text, not an image at all", None, "unsupported format or not an image")


def test_corrupt_and_truncated(root):
    data = png_bytes((64, 64), seed=3)
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    refused(root / "truncated.png", ImagePolicy(allowed_roots=(root,)), "corrupt or truncated", "truncated.png")
    refused(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, None, "corrupt or truncated")
    refused(b"", None, "empty")


@pytest.mark.parametrize(
    "text",
    ["a" + " " * 200_000 + "!", " " * 200_000 + "!", "a\n" * 100_000 + "=!", "A" * 200_000 + "===", "a= " * 70_000],
)
def test_base64_check_is_linear(text):
    start = time.perf_counter()
    assert not images_module._looks_like_base64_image(text)
    assert time.perf_counter() - start < 1.0


def test_long_strings_are_classified_quickly(root):
    start = time.perf_counter()
    refused("a" + " " * 200_000 + "!", ImagePolicy(allowed_roots=(root,)), "path too long")
    assert time.perf_counter() - start < 1.0


@given(st.text(alphabet="Ab9+/= \n\t\x0b\u00a0\u2028!-", max_size=12))
def test_base64_text_check_keeps_its_language(text):
    old = re.compile(r"^[A-Za-z0-9+/\s]+={0,2}\s*$")  # the former check, quadratic on long input
    assert images_module._is_base64_text(text) == bool(old.match(text))


def test_bad_encodings_and_types():
    refused("data:text/plain;base64,aGVsbG8=", None, "not an image", "data URI")
    refused("data:image/png,rawtext", None, "not base64")
    refused("data:image/png;base64,@@@@", None, "invalid base64")
    refused(np.zeros((4, 4), np.float32), None, "uint8", "numpy array")
    refused(np.zeros((4, 4, 2), np.uint8), None, "HxW, HxWx3 or HxWx4")
    refused(12345, None, "unsupported source type", "<int>")


# ----- URLs: refused before any connection --------------------------------------------------


URLS_ON = ImagePolicy(allow_urls=True)


def test_urls_disabled_by_default():
    refused("http://127.0.0.1:9/x.png", None, "URL fetching is disabled", "http://127.0.0.1:9/x.png")
    refused("https://example.com/x.png", ImagePolicy(), "disabled", "example.com")


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://127.0.0.1:9/x.png", "loopback"),
        ("http://127.8.9.10/x.png", "loopback"),
        ("http://[::1]:9/x.png", "loopback"),
        ("http://[::ffff:127.0.0.1]/x.png", "loopback"),
        ("http://10.1.2.3/x.png", "private"),
        ("http://192.168.0.1/x.png", "private"),
        ("https://172.16.5.4/x.png", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://[fe80::1]/x.png", "link-local"),
        ("http://224.0.0.1/x.png", "multicast"),
        ("http://0.0.0.0/x.png", "unspecified"),
        ("http://240.0.0.1/x.png", "reserved"),
        ("http://100.64.0.1/x.png", "not globally routable"),
    ],
)
def test_refused_addresses(url, kind):
    error = refused(url, URLS_ON, f"refused address .*\\({kind}\\)", url)
    assert error.source == repr(url)


def test_address_problem_classification():
    assert address_problem("8.8.8.8") is None
    assert address_problem("2606:4700::1111") is None
    assert address_problem("127.0.0.1") == "loopback"
    assert address_problem("fd00::1") == "private"


def test_disallowed_host_refused_before_dns():
    policy = ImagePolicy(allow_urls=True, allowed_hosts=("images.example.com",))
    refused("http://other.invalid/x.png", policy, "not in allowed_hosts", "other.invalid")


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x.png", "file:///etc/passwd", "gopher://127.0.0.1/"])
def test_other_schemes_refused(url):
    refused(url, URLS_ON, "scheme .* is not allowed", url.split("/")[0])


def test_credentials_in_url_refused():
    refused("http://user:pw@127.0.0.1/x.png", URLS_ON, "credentials")


# ----- URLs against a local server on 127.0.0.1 ----------------------------------------------


PNG = png_bytes((12, 8), seed=5)


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        if self.path == "/slow":
            time.sleep(1.0)
        status, headers, body = self.routes.get(self.path, (404, {}, b"missing"))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value.format(port=self.server.server_address[1]))
        if "Content-Length" not in headers:
            self.close_connection = True  # body ends at connection close
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading (size caps)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    _Handler.routes = {
        "/img.png": (200, {"Content-Type": "image/png", "Content-Length": str(len(PNG))}, PNG),
        "/nolength.png": (200, {"Content-Type": "image/png"}, PNG),
        "/redirect": (302, {"Location": "/img.png", "Content-Length": "0"}, b""),
        "/redirect2": (301, {"Location": "http://127.0.0.1:{port}/redirect", "Content-Length": "0"}, b""),
        "/loop": (302, {"Location": "/loop", "Content-Length": "0"}, b""),
        "/to-private": (302, {"Location": "http://10.0.0.7/img.png", "Content-Length": "0"}, b""),
        "/to-v6-loopback": (302, {"Location": "http://[::1]:{port}/img.png", "Content-Length": "0"}, b""),
        "/to-file": (302, {"Location": "file:///etc/passwd", "Content-Length": "0"}, b""),
        "/big": (200, {"Content-Length": str(len(PNG) * 50)}, PNG * 50),
        "/big-nolength": (200, {}, PNG * 50),
        "/lying-length": (200, {"Content-Length": "10"}, PNG),
    }
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


LOCAL = ImagePolicy(allow_urls=True, allow_private_addresses=True, allowed_hosts=("127.0.0.1",))


def test_local_server_refused_without_test_flag(server):
    refused(f"{server}/img.png", URLS_ON, r"refused address 127\.0\.0\.1 \(loopback\)", "/img.png")


def test_fetch_and_redirects(server):
    expected = pixels(Image.open(io.BytesIO(PNG)))
    for path in ("/img.png", "/nolength.png", "/redirect", "/redirect2"):
        assert np.array_equal(pixels(load_image(server + path, LOCAL)), expected), path


def test_redirect_cap(server):
    refused(f"{server}/loop", LOCAL, "too many redirects", "/loop")
    policy = ImagePolicy(allow_urls=True, allow_private_addresses=True, max_redirects=1)
    refused(f"{server}/redirect2", policy, "too many redirects")
    assert load_image(f"{server}/redirect", policy).size == (12, 8)


def test_redirect_target_host_rechecked(server):
    refused(f"{server}/to-private", LOCAL, "redirect to .*10.0.0.7.* refused: host '10.0.0.7' is not in allowed_hosts")


def test_redirect_target_address_rechecked(server, monkeypatch):
    """Only 127.0.0.1 is let through; the redirect to [::1] is vetted again and refused."""
    real = images_module.address_problem
    monkeypatch.setattr(images_module, "address_problem", lambda a: None if a == "127.0.0.1" else real(a))
    policy = ImagePolicy(allow_urls=True)
    assert load_image(f"{server}/img.png", policy).size == (12, 8)
    refused(f"{server}/to-v6-loopback", policy, r"refused address ::1 \(loopback\)", "/to-v6-loopback")
    refused(f"{server}/to-private", policy, r"refused address 10\.0\.0\.7 \(private\)")


def test_redirect_to_other_scheme_refused(server):
    refused(f"{server}/to-file", LOCAL, "HTTP error 302|scheme")


def test_download_size_caps(server):
    policy = ImagePolicy(allow_urls=True, allow_private_addresses=True, max_bytes=len(PNG) * 10)
    refused(f"{server}/big", policy, "too large: .* declared", "/big")
    refused(f"{server}/big-nolength", policy, "too large: more than", "/big-nolength")
    assert load_image(f"{server}/img.png", policy).size == (12, 8)


def test_http_errors_and_truncated_bodies(server):
    refused(f"{server}/nothing-here", LOCAL, "HTTP error 404")
    refused(f"{server}/lying-length", LOCAL, "corrupt or truncated")


def test_download_timeout(server):
    policy = ImagePolicy(allow_urls=True, allow_private_addresses=True, timeout_s=0.2)
    refused(f"{server}/slow", policy, "timed out", "/slow")


def test_url_decoding_obeys_format_policy(server):
    policy = ImagePolicy(allow_urls=True, allow_private_addresses=True, allowed_formats=("JPEG",))
    refused(f"{server}/img.png", policy, "unsupported format PNG")


# ----- documentation ---------------------------------------------------------------


def _doc_examples() -> list[str]:
    doc = Path(__file__).resolve().parent.parent / "docs" / "images.md"
    return re.findall(r"^```python\n(.*?)^```", doc.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_docs_have_examples():
    assert len(_doc_examples()) >= 5


@pytest.mark.parametrize("index", range(len(_doc_examples())))
def test_doc_example_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(_doc_examples()[index], f"docs/images.md example {index}", "exec"), {"__name__": "doc_example"})

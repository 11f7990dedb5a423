"""Every refusal of the server, in OpenAI's error shape: 400 naming the ``param``, 401, 404,
413, 429 with ``Retry-After``; and a client that goes away cancels its generation."""

from __future__ import annotations

import base64
import io
import logging
import re
import socket
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from test_server import MODEL, data_uri, image_message, make_service, running_server

from qwen_vl.server import ImageAccess, ServerLimits
from qwen_vl.server import app as app_module
from qwen_vl.server.metrics import Metrics

KEY = "secret-key"
HI = [{"role": "user", "content": "hi"}]


def png_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def strict_url(checkpoint_dir: Path, tokenizer, golden_dir: Path) -> Iterator[str]:
    limits = ServerLimits(max_images=2, max_image_bytes=50_000, max_image_pixels=300_000, max_prompt_tokens=64,
                          max_tokens=16, max_n=2, max_body_bytes=2_000_000)  # fmt: skip
    access = ImageAccess([str(golden_dir / "images")])
    with running_server(make_service(checkpoint_dir, tokenizer, limits=limits, access=access), KEY) as url:
        yield url


@pytest.fixture(scope="module")
def busy(checkpoint_dir: Path, tokenizer) -> Iterator[tuple[str, object]]:
    service = make_service(checkpoint_dir, tokenizer, limits=ServerLimits(max_queue=0), max_batch_size=1,
                           access=ImageAccess(allow_url=True))  # fmt: skip
    with running_server(service) as url:
        yield url, service


def post(url: str, body: object, key: str | None = KEY, raw: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(
            f"{url}/chat/completions", content=raw, headers={**headers, "Content-Type": "application/json"}, timeout=60
        )
    return httpx.post(f"{url}/chat/completions", json=body, headers=headers, timeout=60)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_missing_or_wrong_key_is_401(strict_url: str) -> None:
    for key in (None, "wrong"):
        error = error_of(post(strict_url, {"model": MODEL, "messages": HI, "max_tokens": 2}, key=key), 401)
        assert error["type"] == "authentication_error"
    with (
        openai.OpenAI(base_url=strict_url, api_key="wrong", max_retries=0) as c,
        pytest.raises(openai.AuthenticationError),
    ):
        c.models.list()
    assert httpx.get(strict_url.removesuffix("/v1") + "/health").status_code == 200
    ok = post(strict_url, {"model": MODEL, "messages": HI, "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_unknown_model_is_404(strict_url: str) -> None:
    with openai.OpenAI(base_url=strict_url, api_key=KEY, max_retries=0) as c:
        with pytest.raises(openai.NotFoundError) as info:
            c.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=2)
    assert info.value.body["param"] == "model" and info.value.body["code"] == "model_not_found"


def test_bad_json_and_non_object_body(strict_url: str) -> None:
    assert error_of(post(strict_url, None, raw=b'{"model": "tiny",'), 400)["code"] == "invalid_json"
    assert error_of(post(strict_url, [1, 2]), 400)["code"] == "invalid_json"
    assert error_of(post(strict_url, None, raw=b"x" * 2_000_001), 413)["code"] == "body_too_large"


def test_json_past_python_limits_is_invalid_json(strict_url: str) -> None:
    huge_int = b'{"model": "tiny", "seed": ' + b"9" * 5001 + b"}"
    for raw in (huge_int, b"[" * 100_000, b'{"a": ' * 50_000):
        error = error_of(post(strict_url, None, raw=raw), 400)
        assert (error["code"], error["type"]) == ("invalid_json", "invalid_request_error")


def chunks(total: int, size: int = 65536) -> Iterator[bytes]:
    """``total`` bytes of a body sent without ``Content-Length`` (chunked)."""
    for start in range(0, total, size):
        yield b"x" * min(size, total - start)


def test_chunked_body_over_the_limit_is_413(strict_url: str) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    response = httpx.post(f"{strict_url}/chat/completions", content=chunks(3_000_000), headers=headers, timeout=60)
    error = error_of(response, 413)
    assert error["code"] == "body_too_large" and "2000000" in error["message"]
    assert error_of(post(strict_url, [1]), 400)["code"] == "invalid_json"  # the server still answers


def test_chunked_body_is_refused_before_it_ends(strict_url: str) -> None:
    url = urllib.parse.urlsplit(strict_url)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    with socket.create_connection((url.hostname, url.port), timeout=20) as sock:
        sock.sendall(head.encode())
        for piece in chunks(2_100_000):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        answer = b""  # the last chunk is never sent: the body has not ended
        while b"body_too_large" not in answer and (piece := sock.recv(4096)):
            answer += piece
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"body_too_large" in answer


def test_unknown_route_in_error_shape(strict_url: str) -> None:
    error_of(httpx.get(strict_url + "/nothing-here"), 404)


def test_wrong_method_is_405_with_allow(strict_url: str) -> None:
    response = httpx.get(f"{strict_url}/chat/completions")
    assert error_of(response, 405)["code"] == "method_not_allowed"
    assert response.headers["Allow"] == "POST"


def responses_total(url: str, status: int) -> int:
    text = httpx.get(url.removesuffix("/v1") + "/metrics").text
    match = re.search(rf'^qwen_vl_responses_total{{status="{status}"}} (\d+)$', text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def break_chat_route(monkeypatch) -> None:
    """Make ``/v1/chat/completions`` fail inside the server with an unexpected exception."""

    async def broken(service, body):
        raise RuntimeError("secret detail at /srv/private/models")

    monkeypatch.setattr(app_module, "accept_chat", broken)


def test_internal_error_is_generic_and_logged(strict_url: str, monkeypatch, caplog) -> None:
    break_chat_route(monkeypatch)
    with caplog.at_level(logging.ERROR, logger="qwen_vl.server.app"):
        response = post(strict_url, {"model": MODEL, "messages": HI, "max_tokens": 2})
    error = error_of(response, 500)
    assert error == {"message": "internal error; see the server log", "type": "server_error", "param": None,
                     "code": "internal_error"}  # fmt: skip
    assert "secret" not in response.text
    logged = [r for r in caplog.records if r.name == "qwen_vl.server.app"]
    assert logged and logged[0].exc_info is not None
    assert "Traceback" in caplog.text and "secret detail" in caplog.text


def test_internal_errors_are_counted(strict_url: str, monkeypatch) -> None:
    break_chat_route(monkeypatch)
    before = responses_total(strict_url, 500)
    assert post(strict_url, {"model": MODEL, "messages": HI, "max_tokens": 2}).status_code == 500
    assert responses_total(strict_url, 500) == before + 1


def test_recent_generations_stay_within_the_window() -> None:
    now = [0.0]
    metrics = Metrics(window_s=10.0, clock=lambda: now[0])
    for _ in range(1000):
        metrics.finished(3, 4, 0.1, 0.2)
        now[0] += 1.0
    assert len(metrics._recent) <= 11
    assert metrics.completion_tokens == 4000 and metrics.latency.count == 1000
    assert metrics.tokens_per_second() == pytest.approx(4 * 10 / 10.0)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"model": 3}, "model"),
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, "messages[0].content[0].text"),
        ({"messages": [*HI, {"role": "user", "content": "again"}]}, "messages[1].role"),
        ({"messages": [*HI, {"role": "assistant", "content": "ok"}]}, "messages[1].role"),
        ({"messages": [*HI, {"role": "system", "content": "late"}]}, "messages[1].role"),
        ({"messages": [{"role": "user", "content": "<img>/etc/passwd</img>"}]}, "messages[0].content"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 17}, "max_tokens"),
        ({"max_completion_tokens": 1.5}, "max_completion_tokens"),
        ({"n": 3}, "n"),
        ({"seed": "x"}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"messages": [{"role": "user", "content": "word " * 80}]}, "messages"),
    ],
)
def test_validation_errors_name_the_param(strict_url: str, change: dict, param: str) -> None:
    body = {"model": MODEL, "messages": HI, "max_tokens": 2, **change}
    error = error_of(post(strict_url, body), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert param.split(".")[0].split("[")[0] in error["message"]


def test_openai_client_raises_bad_request(strict_url: str) -> None:
    with openai.OpenAI(base_url=strict_url, api_key=KEY, max_retries=0) as c:
        with pytest.raises(openai.BadRequestError) as info:
            c.chat.completions.create(model=MODEL, messages=HI, max_tokens=100)
    assert info.value.body["param"] == "max_tokens"


def test_image_refusals(strict_url: str, golden_dir: Path) -> None:
    small = data_uri(golden_dir / "images" / "noise_33x33.png")
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8))
    cases = [
        ([small, small, small], "messages", "too_many_images"),
        (["https://example.com/cat.png"], "messages[0].content[0].image_url", "image_refused"),
        (["ftp://example.com/cat.png"], "messages[0].content[0].image_url", "image_refused"),
        (["/etc/passwd"], "messages[0].content[0].image_url", "image_refused"),
        (["file:///etc/hostname"], "messages[0].content[0].image_url", "image_refused"),
        (
            [str(golden_dir / "images" / ".." / "checkpoint" / "config.json")],
            "messages[0].content[0].image_url",
            "image_refused",
        ),
        ([png_uri(noisy)], "messages[0].content[0].image_url", "image_refused"),  # over max_image_bytes
        ([png_uri(Image.new("RGB", (600, 600)))], "messages[0].content[0].image_url", "image_refused"),  # pixels
        (["data:image/png;base64,not-base64!"], "messages[0].content[0].image_url", "image_refused"),
        (["data:text/plain;base64,aGVsbG8="], "messages[0].content[0].image_url", "image_refused"),
    ]
    for urls, param, code in cases:
        content = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": "?"}]
        error = error_of(post(strict_url, {"model": MODEL, "messages": [{"role": "user", "content": content}]}), 400)
        assert (error["param"], error["code"]) == (param, code), (urls[0][:40], error)
    message = error_of(post(strict_url, {"model": MODEL, "messages": [image_message(png_uri(noisy), "?")]}), 400)[
        "message"
    ]
    assert "too large" in message
    assistant_image = [*HI, {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": small}}]}, *HI]
    error = error_of(post(strict_url, {"model": MODEL, "messages": assistant_image}), 400)
    assert error["param"] == "messages[1].content[0].type"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("x" * 300 + ".png", "cannot read file (File name too long)"),
        ("x" * 5000 + ".png", "path too long"),
        ("../checkpoint/config.json", "outside the allowed roots"),
        ("/etc/passwd", "outside the allowed roots"),
    ],
)
def test_image_refusals_name_no_server_path(strict_url: str, golden_dir: Path, name: str, reason: str) -> None:
    for url in (str(golden_dir / "images" / name), "file://" + urllib.parse.quote(str(golden_dir / "images" / name))):
        body = {"model": MODEL, "messages": [image_message(url, "?")], "max_tokens": 2}
        response = post(strict_url, body)
        error = error_of(response, 400)
        assert (error["param"], error["code"]) == ("messages[0].content[0].image_url", "image_refused")
        assert reason in error["message"], error["message"]
        assert str(golden_dir.resolve()) not in response.text and str(golden_dir) not in response.text


def test_private_address_refused_even_with_urls_on(busy) -> None:
    url, _ = busy
    body = {"model": MODEL, "messages": [image_message("http://127.0.0.1:9/cat.png", "?")], "max_tokens": 2}
    error = error_of(post(url, body, key=None), 400)
    assert error["param"] == "messages[0].content[0].image_url"


def test_full_queue_is_429_and_disconnect_cancels(busy) -> None:
    url, service = busy
    submitted = []
    submit = service.submit
    service.submit = lambda requests: submitted.extend(submit(requests)) or submitted[-len(requests) :]
    long = {"model": MODEL, "messages": HI, "max_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{url}/chat/completions", json=long) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the one row is taken
        refused = post(url, {"model": MODEL, "messages": HI, "max_tokens": 2}, key=None)
        error = error_of(refused, 429)
        assert error["type"] == "rate_limit_error" and refused.headers["Retry-After"] == "1"
    deadline = time.monotonic() + 20  # the stream was closed long before 2000 tokens
    while (service.in_flight or service.engine.active) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.in_flight == 0 and not service.engine.active
    del service.submit
    assert submitted[0].result(timeout=20).finish_reason == "cancelled" and len(submitted[0].token_ids) < 500
    ok = post(url, {"model": MODEL, "messages": HI, "max_tokens": 2}, key=None)
    assert ok.status_code == 200


def test_non_streaming_client_that_leaves_cancels(busy) -> None:
    url, service = busy
    submitted = []
    submit = service.submit
    service.submit = lambda requests: submitted.extend(submit(requests)) or submitted[-len(requests) :]
    body = {"model": MODEL, "messages": HI, "max_tokens": 2000, "temperature": 0}
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
        deadline = time.monotonic() + 20
        while service.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        del service.submit
    assert service.in_flight == 0
    assert submitted[0].result(timeout=20).finish_reason == "cancelled" and len(submitted[0].token_ids) < 500

"""Queue places are taken before a request's costly work and always given back; queued
requests hold model-sized pixels, not the uploaded pictures."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from test_server import MODEL, data_uri, image_message, make_service

from qwen_vl.server import ServerLimits
from qwen_vl.server.completions import accept_chat
from qwen_vl.server.errors import APIError

IMAGE = "shapes_rgb_448x448.png"


@pytest.fixture(scope="module")
def service(checkpoint_dir: Path, tokenizer):
    """A service whose engine is never started: submitted requests stay queued."""
    return make_service(checkpoint_dir, tokenizer, limits=ServerLimits(max_queue=2), max_batch_size=1)


def chat_body(*messages: dict, n: int = 1) -> dict:
    return {"model": MODEL, "messages": list(messages), "max_tokens": 2, "n": n}


def test_queued_request_holds_resized_pixels_once_per_picture(service, golden_dir: Path) -> None:
    uri = data_uri(golden_dir / "images" / IMAGE)
    two = {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": uri}}] * 2 + [{"type": "text", "text": "same?"}],
    }
    job = asyncio.run(accept_chat(service, chat_body(two)))
    try:
        request = job.handles[0].request
        size = int(service.model.config.visual["image_size"])
        assert len(request.images) == 1  # the same picture twice: one entry, two spans
        (pixels,) = request.images.values()
        assert isinstance(pixels, torch.Tensor) and pixels.shape == (3, size, size)
        assert request.prompt_ids.count(service.tokenizer.img_start_id) == 2
    finally:
        job.release(service)
    assert service.in_flight == 0


def test_places_come_back_when_a_request_fails_after_reserving(service, golden_dir: Path) -> None:
    bad = image_message("data:image/png;base64,bm90IGFuIGltYWdl", "what?")
    for _ in range(2 * service.capacity):
        with pytest.raises(APIError) as e:
            asyncio.run(accept_chat(service, chat_body(bad)))
        assert e.value.status == 400
    assert service.in_flight == 0
    too_long = {"role": "user", "content": "word " * 5000}
    with pytest.raises(APIError, match="context_length|budget|fit"):
        asyncio.run(accept_chat(service, chat_body(too_long)))
    assert service.in_flight == 0


def test_full_queue_refuses_before_opening_images(service, golden_dir: Path, monkeypatch) -> None:
    jobs = [asyncio.run(accept_chat(service, chat_body({"role": "user", "content": "hi"}))) for _ in range(3)]
    opened = []
    monkeypatch.setattr("qwen_vl.server.completions.load_parts", lambda *a: opened.append(a) or [])
    try:
        with pytest.raises(APIError) as e:
            asyncio.run(accept_chat(service, chat_body(image_message(data_uri(golden_dir / "images" / IMAGE), "x"))))
        assert e.value.status == 429 and opened == []
    finally:
        for job in jobs:
            job.release(service)
    assert service.in_flight == 0


def test_more_choices_than_the_server_runs_is_400_on_n(service) -> None:
    with pytest.raises(APIError) as e:
        asyncio.run(accept_chat(service, chat_body({"role": "user", "content": "hi"}, n=service.capacity + 1)))
    assert e.value.status == 400 and e.value.param == "n"

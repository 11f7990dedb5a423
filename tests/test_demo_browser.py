"""The web demo in a real browser: headless Chromium (Debian's ``chromium`` package) driven by
Playwright. One app per module, on 127.0.0.1, on the golden checkpoint; each test opens its
own page (its own session). Screenshots go to ``$QWEN_VL_TEST_ARTIFACTS`` (else a temporary
folder); ``demo-grounding.png`` is the one in docs/demo.md.

Without chromium, playwright or gradio these tests skip here, and fail in CI, which installs them.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_demo import GROUNDED, QUESTION, expected_chat, script_answer, shapes_picture

from qwen_vl.cli.options import GenerationOptions, ModelOptions
from qwen_vl.demo import DemoLimits

# gradio's queue calls pandas options that pandas 3 deprecates
pytestmark = [
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]
CHROMIUM = Path("/usr/bin/chromium")
MAX_NEW_TOKENS = 8
WAIT_MS = 60_000


def require(ok: bool, reason: str) -> None:
    """Skip without a tool the tests need; in CI (which installs it) fail instead."""
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; .ci/run installs it")
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = os.environ.get("QWEN_VL_TEST_ARTIFACTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("demo-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def app(checkpoint_dir: Path, tmp_path_factory):
    """The demo (greedy, 8 new tokens, 2 rows) serving on 127.0.0.1 for the whole module."""
    require(importlib.util.find_spec("gradio") is not None, "gradio is not installed (pip install -e .)")
    from qwen_vl.cli.demo import build_demo_app, gradio_ui

    model = ModelOptions(checkpoint_dir, quiet=True, max_seq_len=2048)
    options = GenerationOptions(do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    limits = DemoLimits(max_images=4, max_new_tokens=64)
    blocks, service = build_demo_app(model, options, limits, 2, tmp_path_factory.mktemp("demo"))
    url = gradio_ui().launch(blocks, service, "127.0.0.1", free_port())
    yield SimpleNamespace(url=url, service=service)
    blocks.close()
    service.stop()
    service.folder.close()
    assert not service.folder.exists


@pytest.fixture(scope="module")
def browser(app):
    require(CHROMIUM.is_file(), f"{CHROMIUM} not found (apt-get install chromium)")
    require(importlib.util.find_spec("playwright") is not None, "playwright is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app):
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, locale="en-US")
    page = context.new_page()
    page.goto(app.url)
    page.locator("#message textarea").wait_for(timeout=WAIT_MS)
    yield page
    context.close()


def send(page, text: str, pictures: list[Path] = ()) -> None:
    """Attach ``pictures`` with the upload button's file input, type ``text``, press Enter."""
    from playwright.sync_api import expect

    if pictures:
        page.set_input_files("#message input[type=file]", [str(p) for p in pictures])
        expect(page.locator("#message img")).to_have_count(len(pictures), timeout=WAIT_MS)
    page.fill("#message textarea", text)
    page.press("#message textarea", "Enter")


def answers(page):
    """The text of every answer in the chat window, oldest first."""
    return page.locator("#chatbot [data-testid=bot] .message-content")


def test_questions_get_the_streamed_answers_of_chat(page, fp32_model, tokenizer, tmp_path, artifacts):
    from playwright.sync_api import expect

    picture = shapes_picture(tmp_path / "shapes.png", (480, 360))
    turns = [([picture], QUESTION), ([], "And the colours?")]
    expected = [response for _, response in expected_chat(fp32_model, tokenizer, turns, MAX_NEW_TOKENS)]
    send(page, QUESTION, [picture])
    expect(answers(page)).to_have_text(expected[:1], timeout=WAIT_MS)
    expect(page.locator("#chatbot [data-testid=user] img")).to_have_count(1)  # the upload is shown
    expect(page.locator("#message textarea")).to_be_editable(timeout=WAIT_MS)  # enabled again after the answer
    send(page, "And the colours?")
    expect(answers(page)).to_have_text(expected, timeout=WAIT_MS)
    page.screenshot(path=artifacts / "demo-answer.png")


def test_grounded_answer_shows_the_drawn_picture(page, app, monkeypatch, tokenizer, tmp_path, artifacts):
    from playwright.sync_api import expect

    picture = shapes_picture(tmp_path / "shapes.png", (480, 360))
    script_answer(monkeypatch, app.service.engine, tokenizer, GROUNDED)  # the tiny model knows no boxes
    send(page, "框出图中红色的圆形和蓝色的正方形", [picture])
    drawn = page.locator("#chatbot [data-testid=bot] img")
    expect(drawn).to_have_count(1, timeout=WAIT_MS)
    expect(drawn).to_have_attribute("src", re.compile(r"/boxes/image-[0-9a-f]+-boxes-\d+\.png$"))
    drawn.evaluate("img => img.decode()")  # loaded and decodable
    assert drawn.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [480, 360]
    expect(answers(page)).to_have_text([GROUNDED])  # the tags stay visible, as chat() returns them
    page.set_viewport_size({"width": 1280, "height": 1320})  # the whole conversation in the window
    page.locator("#chatbot [data-testid=user] img").evaluate("img => img.decode()")
    page.screenshot(path=artifacts / "demo-grounding.png")


def test_regenerate_undo_and_clear(page, app, monkeypatch, tokenizer, tmp_path):
    from playwright.sync_api import expect

    picture = shapes_picture(tmp_path / "shapes.png")
    seen = script_answer(monkeypatch, app.service.engine, tokenizer, "A red circle.")
    send(page, QUESTION, [picture])
    expect(answers(page)).to_have_text(["A red circle."], timeout=WAIT_MS)
    later = script_answer(monkeypatch, app.service.engine, tokenizer, "A red circle and a blue square.")
    page.click("#regenerate")
    expect(answers(page)).to_have_text(["A red circle and a blue square."], timeout=WAIT_MS)
    assert seen[0].prompt_ids == later[0].prompt_ids  # the same question, answered again
    page.click("#undo")
    expect(page.locator("#chatbot [data-testid=user]")).to_have_count(0, timeout=WAIT_MS)
    expect(page.locator("#message textarea")).to_have_value(QUESTION)  # back in the box, picture too
    expect(page.locator("#message img")).to_have_count(1)
    page.press("#message textarea", "Enter")
    expect(answers(page)).to_have_count(1, timeout=WAIT_MS)
    page.click("#clear")
    expect(page.locator("#chatbot [data-testid=user]")).to_have_count(0, timeout=WAIT_MS)
    send(page, "Hello")
    expect(answers(page)).to_have_count(1, timeout=WAIT_MS)
    assert "<img>" not in tokenizer.decode(later[-1].prompt_ids)  # a new conversation


def test_refused_upload_names_the_file(page, tmp_path):
    from playwright.sync_api import expect

    fake = tmp_path / "notes.png"
    fake.write_text("not a picture")
    page.set_input_files("#message input[type=file]", str(fake))
    page.fill("#message textarea", "What is this?")
    page.press("#message textarea", "Enter")
    expect(page.get_by_text("notes.png: unsupported format or not an image")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#message textarea")).to_have_value("What is this?")  # nothing lost
    expect(page.locator("#chatbot [data-testid=user]")).to_have_count(0)


def test_examples_fill_the_message_box(page):
    from playwright.sync_api import expect

    page.get_by_text("框出图中黄色的圆形的位置", exact=True).click()
    expect(page.locator("#message textarea")).to_have_value("框出图中黄色的圆形的位置", timeout=WAIT_MS)
    expect(page.locator("#message img")).to_have_count(1)  # with the example picture
    page.get_by_text("Describe the picture.", exact=True).click()
    expect(page.locator("#message textarea")).to_have_value("Describe the picture.")

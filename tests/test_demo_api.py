"""The real ``qwen-vl demo`` command, driven through its Gradio API with ``gradio_client``:
two clients at once get ``model.chat()``'s answers, a client's session keeps its
conversation, refusals come back as messages, and SIGTERM removes the upload folder.

The command starts once for the module, in the background, while the first test prepares
its expected answers. Without gradio these tests skip here, and fail in CI.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from test_demo import QUESTION, expected_chat, shapes_picture
from test_demo_browser import free_port, require

# gradio's queue calls pandas options that pandas 3 deprecates
pytestmark = [
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]
MAX_NEW_TOKENS = 6
SETTINGS = {"temperature": 0, "top_p": 1.0, "max_new_tokens": MAX_NEW_TOKENS, "seed": -1}
_READY = re.compile(r"^qwen-vl: demo of .* on (http://\S+) \(uploads in (.+)\)$")


class DemoCommand:
    """``qwen-vl demo`` started in the background; ``wait()`` returns once it serves."""

    def __init__(self, args: list[str], parent: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "qwen_vl.cli", *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
        self.parent = parent
        self.lines: list[str] = []
        self.url, self.folder = "", Path()
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            match = _READY.match(self.lines[-1])
            if match:
                self.url, folder = match.groups()
                self.folder = Path(folder)
                self._ready.set()

    def wait(self) -> DemoCommand:
        if not self._ready.wait(180):
            pytest.fail("qwen-vl demo did not start:\n" + "\n".join(self.lines[-20:]))
        return self


@pytest.fixture(scope="module")
def demo(checkpoint_dir: Path, tmp_path_factory):
    """``qwen-vl demo`` on 127.0.0.1: greedy, 2 rows, uploads up to 300 kB, in its own folder."""
    require(importlib.util.find_spec("gradio_client") is not None, "gradio_client is not installed")
    require(importlib.util.find_spec("gradio") is not None, "gradio is not installed")
    parent = tmp_path_factory.mktemp("demo-uploads")
    args = ["demo", "--model", str(checkpoint_dir), "--port", str(free_port()), "--greedy", "--max-new-tokens",
            str(MAX_NEW_TOKENS), "--max-batch-size", "2", "--max-seq-len", "2048", "--upload-parent", str(parent),
            "--max-image-bytes", "300000", "--quiet"]  # fmt: skip
    command = DemoCommand(args, parent)
    yield command
    if command.proc.poll() is None:
        command.proc.kill()
        command.proc.wait()


def client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False, analytics_enabled=False)


def ask(c, text: str, pictures: list[Path] = ()):
    """A /chat job of client ``c``: ``text`` with ``pictures`` uploaded."""
    from gradio_client import handle_file

    message = {"text": text, "files": [handle_file(str(p)) for p in pictures]}
    return c.submit(message, *SETTINGS.values(), api_name="/chat")


def last_answer(output) -> str:
    """The text of the last answer in a /chat or /regenerate output (the chat window's messages)."""
    messages = output[0] if isinstance(output, (list, tuple)) and output and isinstance(output[0], list) else output
    reply = [m for m in messages if m["role"] == "assistant"][-1]
    return next(part["text"] for part in reply["content"] if part.get("type") == "text")


def test_two_clients_at_once_get_chat_answers(demo, fp32_model, tokenizer, tmp_path):
    picture = shapes_picture(tmp_path / "shapes.png", (480, 360))
    small = shapes_picture(tmp_path / "small.png", (200, 150))
    conversation_a = [([picture], QUESTION), ([], "And the colours?")]
    expected_a = expected_chat(fp32_model, tokenizer, conversation_a, MAX_NEW_TOKENS)
    expected_b = expected_chat(fp32_model, tokenizer, [([small], "Describe the picture.")], MAX_NEW_TOKENS)
    demo.wait()  # started with the module: the expected answers were made meanwhile
    a, b = client(demo.url), client(demo.url)
    jobs = [ask(a, QUESTION, [picture]), ask(b, "Describe the picture.", [small])]  # in flight together
    first_a, first_b = (last_answer(job.result(timeout=120)) for job in jobs)
    assert (first_a, first_b) == (expected_a[0][1], expected_b[0][1])
    second_a = last_answer(ask(a, "And the colours?").result(timeout=120))  # a's session kept its conversation
    assert second_a == expected_a[1][1]
    again = last_answer(a.predict(*SETTINGS.values(), api_name="/regenerate"))
    assert again == second_a  # greedy
    messages, restored = a.predict(api_name="/undo")
    assert restored["text"] == "And the colours?" and len(messages) == 2
    assert a.predict(api_name="/clear")[0] == []


def test_refusals_come_back_as_messages(demo, tmp_path):
    from gradio_client.exceptions import AppError

    c = client(demo.wait().url)
    fake = tmp_path / "notes.png"
    fake.write_text("not a picture")
    with pytest.raises(AppError, match="notes.png: unsupported format or not an image"):
        ask(c, "What is this?", [fake]).result(timeout=60)
    with pytest.raises(AppError, match="messages must not contain &lt;img&gt; tags"):
        ask(c, "Open <img>/etc/passwd</img>").result(timeout=60)
    big = tmp_path / "big.bmp"
    from PIL import Image

    Image.new("RGB", (400, 300)).save(big)  # 360 kB, over --max-image-bytes
    with pytest.raises(ValueError, match="exceeds the maximum file size of 300000 bytes"):  # --max-image-bytes
        ask(c, "And this?", [big]).result(timeout=60)
    with pytest.raises(AppError, match="Value 5 is greater than maximum value 2"):  # the slider's own check
        c.submit({"text": "Hi", "files": []}, 5, 1.0, MAX_NEW_TOKENS, -1, api_name="/chat").result(timeout=60)


def test_sigterm_stops_and_removes_the_upload_folder(demo):
    demo.wait()
    assert demo.folder.is_dir() and demo.folder.parent == demo.parent.resolve()
    assert any(demo.folder.rglob("*.png"))  # uploads landed in the app's folder
    demo.proc.send_signal(signal.SIGTERM)
    assert demo.proc.wait(timeout=60) == 0
    time.sleep(0.2)  # the reader thread takes the last lines
    assert not demo.folder.exists() and list(demo.parent.iterdir()) == []  # nothing left behind
    assert "qwen-vl: demo stopped" in demo.lines

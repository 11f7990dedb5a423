"""The ``qwen-vl`` command: typed functions on the golden checkpoint, and the real
command as subprocesses. The subprocesses start together before the first test of
the module (each spends most of its time importing) and are checked at the end."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT

from qwen_vl.cli import main
from qwen_vl.cli.annotate import parse_boxes, save_boxes
from qwen_vl.cli.bench import HEADER
from qwen_vl.cli.chat import ChatLoop
from qwen_vl.cli.generate import answer_once
from qwen_vl.cli.image_store import ImageStore
from qwen_vl.cli.options import GenerationOptions, ImageOptions
from qwen_vl.cli.session import ChatSession
from qwen_vl.engine.reply_text import readable_ids
from qwen_vl.images import ImagePolicy, load_image

QUESTION = "What is in the picture?"
GREEDY4 = GenerationOptions(max_new_tokens=4, do_sample=False)


@pytest.fixture(scope="module")
def image(golden_dir: Path) -> Path:
    return golden_dir / "images" / "shapes_rgb_448x448.png"


@pytest.fixture(scope="module")
def pictures(image: Path) -> dict:
    """The ``images=`` mapping that lets model.chat / model.generate see the test image."""
    return {str(image): load_image(image, ImagePolicy(allowed_roots=(image.parent,)))}


# ----- subprocesses, started together ------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def commands(checkpoint_dir: Path, image: Path, tmp_path_factory):
    """The three command lines, running side by side; each test waits for its own."""
    cwd = tmp_path_factory.mktemp("cwd")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    base = [sys.executable, "-m", "qwen_vl.cli"]
    model = ["--model", str(checkpoint_dir), "--greedy", "--max-new-tokens", "4"]

    def start(args: list[str], stdin: str | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(
            base + args,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        if stdin is not None:
            proc.stdin.write(stdin)  # small enough for the pipe; closed by communicate()
            proc.stdin.flush()
        return proc

    procs = {
        "one_shot": start(["chat", *model, "--image", str(image), QUESTION]),
        "interactive": start(
            ["chat", *model, "--image", str(image)],
            stdin=f"{QUESTION}\nAnd what colour is it?\n:history\n:clear\nHello\n:quit\nnever read\n",
        ),
        "missing_model": start(["generate", "--model", str(cwd / "missing"), "--prompt", "Hi"]),
    }
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()


# ----- typed functions ---------------------------------------------------------
def test_answer_once_is_official_chat(fp32_model, tokenizer, image, pictures):
    answer = answer_once(fp32_model, tokenizer, QUESTION, [image], GREEDY4)
    assert answer.response == "氮氮氮"
    assert answer.finish_reason == "length" and len(answer.token_ids) == 4
    query = tokenizer.from_list_format([{"image": str(image)}, {"text": QUESTION}])
    assert answer.query == query
    response, _ = fp32_model.chat(tokenizer, query, images=pictures, max_new_tokens=4, do_sample=False)
    assert answer.response == response


def test_session_history_matches_chat(fp32_model, tokenizer, image, pictures, golden_dir):
    """Two turns through the engine give chat()'s responses and history."""
    store = ImageStore(ImageOptions(allow_roots=[str(golden_dir)]).policy())
    with ChatSession(fp32_model, tokenizer, GenerationOptions(max_new_tokens=6, do_sample=False), store) as session:
        session.attach(str(image))
        session.ask(QUESTION)
        session.ask("And what colour is it?")
        history = list(session.history)
    images = pictures
    _, expected = fp32_model.chat(tokenizer, history[0][0], images=images, max_new_tokens=6, do_sample=False)
    _, expected = fp32_model.chat(
        tokenizer, "And what colour is it?", expected, images=images, max_new_tokens=6, do_sample=False
    )
    assert history == expected


def test_json_output(checkpoint_dir, image, capsys):
    args = ["generate", "--model", str(checkpoint_dir), "--image", str(image), "--prompt", QUESTION, "--json"]
    assert main(args + ["--greedy", "--max-new-tokens", "4", "--decode-mode", "eager"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)  # progress lines go to stderr only
    assert set(data) == {"response", "token_ids", "finish_reason", "boxes", "usage"}
    assert data["response"] == "氮氮氮" and data["finish_reason"] == "length"
    assert len(data["token_ids"]) == data["usage"]["completion_tokens"] == 4
    assert data["usage"]["prompt_tokens"] > 256  # the image alone takes 258 positions
    assert data["boxes"] == [] or data["boxes"] is None


def test_raw_mode_continues_the_text(fp32_model, tokenizer, image, pictures):
    answer = answer_once(fp32_model, tokenizer, "A picture of", [image], GREEDY4, raw=True)
    text = tokenizer.from_list_format([{"image": str(image)}, {"text": "A picture of"}])
    ids = tokenizer.encode(text)
    assert answer.prompt_tokens == len(ids)  # no ChatML around it
    expected = fp32_model.generate(torch.tensor([ids]), images=pictures, max_new_tokens=4, do_sample=False)[
        0, len(ids) :
    ].tolist()
    assert answer.token_ids == expected
    assert answer.response == tokenizer.decode(expected).replace("<|endoftext|>", "").strip()


def test_bad_inputs_name_the_problem(checkpoint_dir, image, tmp_path, capsys):
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    outside = tmp_path / "outside.png"
    outside.write_bytes(image.read_bytes())
    model = ["--model", str(checkpoint_dir)]
    cases = [
        (["chat", "--model", str(tmp_path / "missing"), "Hi"], ["missing: not a checkpoint directory"]),
        (["chat", *model, "--image", str(not_image), "Hi"], ["notes.txt", "not an image"]),
        (["generate", *model, "--prompt", f"<img>{outside}</img>Hi"], ["outside.png", "outside allowed roots"]),
        (["generate", *model, "--image", str(image), "--prompt", "Hi", "--max-seq-len", "64"], ["over the budget"]),
    ]
    for argv, needles in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("qwen-vl: error: ")
        assert all(n in err for n in needles), err


def test_prompt_roots_allow_written_paths(fp32_model, tokenizer, image):
    query = f"<img>{image}</img>{QUESTION}"
    allowed = ImageOptions(allow_roots=[str(image.parent)])
    assert answer_once(fp32_model, tokenizer, query, (), GREEDY4, allowed).completion_tokens == 4


def test_chat_loop_commands(fp32_model, tokenizer, image, tmp_path):
    out, err = io.StringIO(), io.StringIO()
    with ChatSession(fp32_model, tokenizer, GREEDY4) as session:
        loop = ChatLoop(session, out, err, tmp_path / "boxes")
        lines = [f":image {image}", QUESTION, ":history", ":clear", ":history", ":nope", ":quit", "unread"]
        assert loop.run(lines) == 0
        assert session.history == []
    text = out.getvalue()
    assert text.startswith("氮氮氮\n[1] user: Picture 1: <img>")
    assert text.endswith("(empty)\n")
    assert "attached to the next message" in err.getvalue() and "unknown command ':nope'" in err.getvalue()


def test_boxes_are_parsed_and_drawn(image, tmp_path):
    pytest.importorskip("qwen_vl.grounding", reason="qwen_vl.grounding is not available")
    response = "<ref>the square</ref><box>(100,120),(400,420)</box>"
    assert parse_boxes(response) == [{"label": "the square", "box": [100, 120, 400, 420]}]
    store = ImageStore()
    ref = store.add_named(str(image))
    query = f"Picture 1: <img>{ref}</img>\nWhere is the square?"
    path = save_boxes(response, [query], store, tmp_path)
    assert path is not None and path.parent == tmp_path and path.is_file()
    assert save_boxes("no boxes here", [query], store, tmp_path) is None


def test_bench_random_tiny(capsys):
    argv = ["bench", "--random-config", "tiny", "--batch-sizes", "1,2", "--new-tokens", "4", "--prompt-tokens", "8"]
    argv += ["--decode-mode", "eager"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == HEADER
    rows = [line.split() for line in lines[1:]]
    assert [r[0] for r in rows] == ["1", "2"]
    for r in rows:
        assert r[2] == "4" and float(r[3]) > 0 and float(r[4]) > 0 and r[-1] == "rss"


def test_ids_without_text_are_left_out_of_the_reply():
    vocab = 151860  # ids above this are the model's padding rows: untrained weights may pick them
    assert readable_ids([1, 151900, 2, 151901], vocab, keep_last=True) == [1, 2, 151901]  # the last is cut anyway
    assert readable_ids([1, 151900, 2], vocab, keep_last=False) == [1, 2]


# ----- the command itself ------------------------------------------------------
def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} did not finish within 300 s:\n{err[-3000:]}")
    return proc.returncode, out, err


def test_command_one_shot(commands):
    rc, out, err = finish(commands["one_shot"])
    assert rc == 0, err
    assert out == "氮氮氮\n"  # greedy; the last token dropped as by the official chat()
    assert "Traceback" not in err


def test_command_interactive_over_a_pipe(commands):
    rc, out, err = finish(commands["interactive"])
    assert rc == 0, err
    assert "Traceback" not in err
    lines = out.splitlines()
    assert lines[0] == "氮氮氮"  # the first answer streams exactly what chat() returns
    assert "[1] user: Picture 1: <img>" in out and "[2] user: And what colour is it?" in out
    assert "conversation cleared" in err
    after_history = out.partition("[2] assistant: ")[2].partition("\n")[2]
    assert after_history.strip()  # the answer to "Hello", after :clear; ":quit" then ends the session


def test_command_bad_input_is_one_line(commands):
    rc, out, err = finish(commands["missing_model"])
    assert rc == 2
    assert out == ""
    [line] = err.strip().splitlines()
    assert line.startswith("qwen-vl: error: ") and line.endswith("missing: not a checkpoint directory (no such folder)")


def test_model_demo_names_the_bundled_folder(tmp_path, monkeypatch, capsys):
    from qwen_vl import bundled
    from qwen_vl.cli.errors import CliError
    from qwen_vl.cli.loading import check_model_dir

    monkeypatch.chdir(tmp_path)  # no local folder called "demo"
    empty = tmp_path / "bundled"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    monkeypatch.setitem(bundled.BUNDLED, "demo", empty)
    with pytest.raises(CliError, match="bundled 'demo' model has no weights"):
        check_model_dir("demo")
    (empty / "model.safetensors").write_bytes(b"")
    assert check_model_dir("demo") == empty
    (tmp_path / "demo").mkdir()  # a local folder of that name wins
    with pytest.raises(CliError, match="no config.json"):
        check_model_dir("demo")


def test_python_api_loads_the_bundled_model_by_name(tmp_path, monkeypatch, checkpoint_dir):
    import qwen_vl
    from qwen_vl import bundled
    from qwen_vl.model.loading import CheckpointError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(bundled.BUNDLED, "demo", Path(checkpoint_dir))
    assert qwen_vl.QWenTokenizer.from_pretrained("demo").encode("hi") == [6023]
    model = qwen_vl.QWenLMHeadModel.from_pretrained("demo", dtype="float32")
    assert model.config.hidden_size == qwen_vl.QWenConfig.from_pretrained(checkpoint_dir).hidden_size
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    for name in ("config.json", "qwen.tiktoken", "tokenizer_config.json"):
        (weightless / name).write_bytes((Path(checkpoint_dir) / name).read_bytes())
    monkeypatch.setitem(bundled.BUNDLED, "demo", weightless)
    with pytest.raises(CheckpointError, match="no weights found"):
        qwen_vl.QWenLMHeadModel.from_pretrained("demo")


@pytest.mark.parametrize("command", [["chat"], ["generate", "--prompt", "hi"], ["serve"]])
def test_model_defaults_to_the_bundled_demo(command):
    from qwen_vl.cli import build_parser

    assert build_parser().parse_args(command).model == "demo"

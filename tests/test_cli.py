"""The ``qwen-vl chat`` command."""

from __future__ import annotations

from qwen_vl.cli import chat_once, main


def test_chat_once_answers_about_an_image(checkpoint_dir, golden_dir):
    image = golden_dir / "images" / "shapes_rgb_448x448.png"
    response = chat_once(checkpoint_dir, "What is in the picture?", [image], max_new_tokens=4)
    assert response == "氮氮氮"  # greedy; the last token is dropped as by the official chat()


def test_cli_errors_name_the_problem(checkpoint_dir, tmp_path, capsys):
    assert main(["chat", "--model", str(tmp_path / "missing"), "Hi"]) == 2
    assert "missing: not a checkpoint directory" in capsys.readouterr().err
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    assert main(["chat", "--model", str(checkpoint_dir), "--image", str(not_image), "Hi"]) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "not an image" in err

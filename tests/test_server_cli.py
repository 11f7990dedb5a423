"""``qwen-vl serve`` as a process: API key from the environment, and SIGTERM drains the
running requests before the process exits."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from qwen_vl.cli import main

KEY = "env-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_options_name_the_problem(checkpoint_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    assert main(["serve", "--model", str(checkpoint_dir), "--max-images", "0"]) == 2
    assert "max_images must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--model", str(checkpoint_dir), "--max-body-bytes", "0"]) == 2
    assert "max_body_bytes must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--model", str(checkpoint_dir), "--allow-root", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_serve_process_drains_on_sigterm(checkpoint_dir: Path) -> None:
    port = free_port()
    env = {**os.environ, "QWEN_VL_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "qwen_vl.cli", "serve", "--model", str(checkpoint_dir), "--port", str(port),
           "--max-seq-len", "1100", "--served-model-name", "tiny", "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not come up: {proc.stdout.read() if proc.poll() is not None else ''}")
            time.sleep(0.1)
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(f"{base}/v1/models").status_code == 401
        assert httpx.get(f"{base}/v1/models", headers=auth).json()["data"][0]["id"] == "tiny"
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000,
                "temperature": 0, "stream": True}  # fmt: skip
        lines: list[str] = []

        def read_stream() -> None:
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=auth, timeout=60) as r:
                lines.extend(line for line in r.iter_lines() if line)

        reader = threading.Thread(target=read_stream)
        reader.start()
        time.sleep(0.3)
        assert reader.is_alive()  # the request is still running when the signal comes
        proc.send_signal(signal.SIGTERM)
        reader.join(60)
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
        assert lines[-1] == "data: [DONE]"
        assert '"finish_reason":"length"' in lines[-2].replace(" ", "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

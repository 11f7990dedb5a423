"""A bounded load test of the server (``bench/server_bench.py``): two rounds of 1,000
requests at concurrency 32, every one answered 200, no 5xx, and memory that does not keep
growing from the first round to the second."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_bench_script


def load_bench():
    return load_bench_script("server_bench")


@pytest.mark.slow
def test_load_nothing_lost_and_memory_flat(checkpoint_dir: Path, tmp_path: Path) -> None:
    argv = ["--model", str(checkpoint_dir), "--requests", "1000", "--concurrency", "32,32", "--max-tokens", "2",
            "--image-every", "4", "--baseline-requests", "4", "--json", str(tmp_path / "load.json")]  # fmt: skip
    result = load_bench().main(argv)
    for phase in result["phases"]:
        assert phase["ok"] == phase["requests"] == 1000 and phase["errors_5xx"] == 0
        assert phase["p99_s"] >= phase["p50_s"] > 0
    assert result["phases"][-1]["rss_growth_mib"] < 64  # the second round grows no more than noise
    assert (tmp_path / "load.json").is_file()

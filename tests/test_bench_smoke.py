"""The engine benchmark runs end to end with tiny numbers, so it cannot rot."""

from __future__ import annotations

import json

from conftest import load_bench_script


def load_bench():
    return load_bench_script("engine_cpu")


def test_quick_benchmark_writes_results(tmp_path, capsys):
    out = tmp_path / "results.json"
    result = load_bench().main(["--quick", "--json", str(out)])
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(result))
    assert [t["batch"] for t in saved["throughput"]] == [1, 2]
    assert saved["throughput"][0]["rows_equal"] == 1  # same greedy tokens as the baseline
    for value in (
        saved["decode_b1"]["ours_tok_s"],
        saved["decode_b1"]["baseline_tok_s"],
        saved["ttft_image"]["ours_s"],
    ):
        assert value > 0
    assert saved["machine"]["torch_version"] and saved["machine"]["cpu_count"]
    assert set(saved["goals"]) == {"decode_b1"}  # batch 16 not run in quick mode
    assert not list(tmp_path.glob(".*.tmp"))
    assert "decode tok/s, batch 1" in capsys.readouterr().out


def test_baseline_matches_engine_on_padded_batch():
    bench = load_bench()
    model = bench.build_model("tiny", 0)
    prompts = bench.random_prompts([9, 3, 6], 1)
    ours = bench.engine_batch(model, prompts, 3, max_seq_len=16)
    base = bench.baseline_batch(model, prompts, 3)
    assert ours["tokens"] == base["tokens"]


def test_gpu_benchmark_quick_runs_on_any_device(tmp_path):
    module = load_bench_script("engine_gpu")
    out = tmp_path / "gpu.json"
    result = module.main(["--quick", "--json", str(out)])
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(result))
    assert saved["correctness"]["ok"] and saved["correctness"]["eager_max_logit_gap"] <= 1e-3
    assert {(r["mode"], r["batch"]) for r in saved["throughput"]["rows"]} >= {("eager", 1), ("eager", 2)}
    assert saved["long_decode"][0]["new_tokens"] == 8
    assert saved["summary"]["eager_b1_vs_baseline"] > 0

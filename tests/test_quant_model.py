"""GPTQ on the golden tiny checkpoint end to end: logits close to the float model's, the
written Int4 directory reloads bit-exactly, act-order and asymmetric zero points, the
``qwen-vl quantize`` command, its progress lines and its errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import CHECKPOINT_DIR, GOLDEN_DIR
from PIL import Image
from safetensors import safe_open
from torch import nn

import qwen_vl
from qwen_vl.cli import main
from qwen_vl.data.synthetic import generate
from qwen_vl.images import image_transform
from qwen_vl.quant.gptq import rtn_quantize
from qwen_vl.quant.linear import QuantLinear
from qwen_vl.quant.quantize import quantize_checkpoint

#: Relative L2 error of the logits, Int4 against the float model, on two held-out prompts
#: (with a picture / text only), calibrated on 8 synthetic conversations. Measured:
#: GPTQ group 128 symmetric 0.050 / 0.219; GPTQ group 32, act-order, asymmetric (6 samples)
#: 0.033 / 0.153; round-to-nearest group 128 0.220 / 0.441. The golden weights are random
#: (no outliers, chaotic activations), so this is far above what a trained model loses.
BOUND_IMAGE, BOUND_TEXT = 0.08, 0.30


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("calib") / "synth"
    generate(out, 8, seed=0)
    return out


@pytest.fixture(scope="module")
def quantized(calib: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int4"
    return quantize_checkpoint(CHECKPOINT_DIR, out, calib, calib_samples=8, dtype="float32", quiet=True)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[tuple[torch.Tensor, list[torch.Tensor] | None]]:
    """A held-out prompt with a picture (not from the calibration set) and a text-only one."""
    query = tokenizer.from_list_format([{"image": "pic.png"}, {"text": "Describe the picture."}])
    _, with_image = qwen_vl.make_context(tokenizer, query, history=None, system="You are a helpful assistant.")
    _, text = qwen_vl.make_context(tokenizer, "How many red shapes are there?", None, "You are a helpful assistant.")
    pixels = image_transform(Image.open(GOLDEN_DIR / "images" / "shapes_rgb_448x448.png"), 448)
    return [(torch.tensor([with_image]), [pixels]), (torch.tensor([text]), None)]


def relative_errors(model: nn.Module, reference: nn.Module, prompts) -> list[float]:
    errors = []
    with torch.no_grad():
        for ids, images in prompts:
            got = model(ids, images=images).logits.double()
            want = reference(ids, images=images).logits.double()
            errors.append(float((got - want).norm() / want.norm()))
    return errors


def test_int4_logits_stay_close_to_the_float_model(quantized, fp32_model, prompts) -> None:
    gptq = relative_errors(quantized.model, fp32_model, prompts)
    assert gptq[0] < BOUND_IMAGE and gptq[1] < BOUND_TEXT, gptq
    rtn = copy.deepcopy(fp32_model)
    for name, module in rtn.named_modules():
        if name.startswith("transformer.h.") and type(module) is nn.Linear:
            module.weight.data = rtn_quantize(module.weight, group_size=128).dequantize()
    nearest = relative_errors(rtn, fp32_model, prompts)
    assert all(g < 0.6 * r for g, r in zip(gptq, nearest)), (gptq, nearest)
    # every decoder linear layer was quantized, nothing else; each one beat its own rounding error budget
    assert sorted(quantized.reports) == sorted(
        n for n, m in quantized.model.named_modules() if isinstance(m, QuantLinear)
    )
    assert len(quantized.reports) == 10 and quantized.samples == 8
    assert "quantized 10 linear layers to 4-bit GPTQ (group size 128, symmetric, act-order off)" in str(quantized)


def test_written_checkpoint_has_the_official_layout(quantized) -> None:
    out = quantized.out_dir
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "quantize_config.json",
        "qwen.tiktoken",
        "tokenizer_config.json",
    ]
    config = json.loads((out / "config.json").read_text())
    expected = {"bits": 4, "group_size": 128, "sym": True, "desc_act": False, "quant_method": "gptq"}
    assert expected.items() <= config["quantization_config"].items()
    assert json.loads((out / "quantize_config.json").read_text()) == config["quantization_config"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
    c_attn = "transformer.h.0.attn.c_attn"
    assert {f"{c_attn}.{k}" for k in ("qweight", "qzeros", "scales", "g_idx", "bias")} <= keys
    assert f"{c_attn}.weight" not in keys and "transformer.visual.conv1.weight" in keys and "lm_head.weight" in keys
    assert (dtypes[f"{c_attn}.qweight"], dtypes[f"{c_attn}.qzeros"], dtypes[f"{c_attn}.g_idx"]) == ("I32",) * 3
    assert dtypes[f"{c_attn}.scales"] == "F16" and dtypes["lm_head.weight"] == "F32"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        mlp_out = f.get_tensor("transformer.h.0.mlp.c_proj.qweight")
        zeros = f.get_tensor("transformer.h.0.mlp.c_proj.qzeros")
    assert mlp_out.shape == (344 // 8, 128) and zeros.shape == (3, 128 // 8)  # 344 inputs: groups 128, 128, 88
    assert bool((zeros == 0x77777777).all())  # symmetric: zero point 8 stored as 7 in every nibble


def test_written_checkpoint_reloads_bit_exactly(quantized, prompts) -> None:
    reloaded = qwen_vl.QWenLMHeadModel.from_pretrained(quantized.out_dir, dtype=torch.float32)
    for name, layer in quantized.model.named_modules():
        if isinstance(layer, QuantLinear):
            other = reloaded.get_submodule(name)
            assert other.state_dict().keys() == layer.state_dict().keys()
            for key, tensor in layer.state_dict().items():
                assert torch.equal(other.state_dict()[key], tensor), f"{name}.{key}"
            assert other.scales.dtype == torch.float16
    with torch.no_grad():
        for ids, images in prompts:
            assert torch.equal(reloaded(ids, images=images).logits, quantized.model(ids, images=images).logits)


def test_act_order_asymmetric_sharded_through_the_command(calib, tmp_path, capsys, fp32_model, prompts) -> None:
    out = tmp_path / "int4-act"
    argv = ["quantize", "--model", str(CHECKPOINT_DIR), "--out", str(out), "--calib", str(calib)]
    argv += ["--group-size", "32", "--act-order", "--no-sym", "--calib-samples", "6", "--dtype", "float32"]
    assert main(argv + ["--max-shard-size", "100MB"]) == 0
    captured = capsys.readouterr()
    assert "act-order on" in captured.out and "on 6 calibration samples" in captured.out
    lines = [line for line in captured.err.splitlines() if " layers | " in line]
    assert len(lines) == 10 and lines[-1].startswith("[####################] 10/10 layers | transformer.h.1.mlp.c_proj")
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) == 2
    config = json.loads((out / "quantize_config.json").read_text())
    assert (config["desc_act"], config["sym"], config["group_size"]) == (True, False, 32)
    model = qwen_vl.QWenLMHeadModel.from_pretrained(out, dtype=torch.float32)
    layer = model.get_submodule("transformer.h.0.mlp.w1")
    assert not torch.equal(layer.g_idx, torch.arange(128, dtype=torch.int32) // 32)  # columns reordered
    assert torch.equal(torch.bincount(layer.g_idx.long()), torch.full((4,), 32))
    errors = relative_errors(model, fp32_model, prompts)
    assert errors[0] < BOUND_IMAGE and errors[1] < BOUND_TEXT, errors


def test_quantize_errors_name_the_problem(calib, tmp_path, capsys, quantized) -> None:
    base = ["quantize", "--model", str(CHECKPOINT_DIR), "--out", str(tmp_path / "o"), "--calib", str(calib)]
    empty = tmp_path / "empty.json"
    empty.write_text("[]", encoding="utf-8")
    not_a_synth_folder = tmp_path / "folder"
    not_a_synth_folder.mkdir()
    cases = [
        (["--bits", "3"], "--bits 3 is not supported: qwen-vl writes 4-bit GPTQ only"),
        (["--method", "awq"], "--method 'awq' is not supported"),
        (["--group-size", "0"], "--group-size must be a positive number of input columns or -1"),
        (["--damp", "1.5"], "--damp must be in (0, 1)"),
        (["--calib-samples", "0"], "--calib-samples must be at least 1"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"qwen-vl: error: {message}") and err.count("\n") == 1, err
    for calib_arg, message in [
        (tmp_path / "missing.json", "calibration data {}: no such file or folder"),
        (empty, "calibration data {} holds no usable conversation record"),
        (not_a_synth_folder, "calibration folder {} has no data.json"),
    ]:
        argv = base[:-1] + [str(calib_arg)]
        assert main(argv) == 2
        assert message.format(calib_arg) in capsys.readouterr().err
    assert (
        main(["quantize", "--model", str(quantized.out_dir), "--out", str(tmp_path / "x"), "--calib", str(calib)]) == 2
    )
    assert "is already an Int4 GPTQ checkpoint" in capsys.readouterr().err
    assert (
        main(["quantize", "--model", str(CHECKPOINT_DIR), "--out", str(quantized.out_dir), "--calib", str(calib)]) == 2
    )
    assert "already exists (choose another directory or pass --overwrite)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

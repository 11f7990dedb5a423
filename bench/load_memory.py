"""Peak resident memory while loading a checkpoint: our meta-device loader against
the usual way (build a randomly initialised model, read the whole state dict,
copy it in). Each method runs in a fresh process.

    python bench/load_memory.py ../shared/golden/checkpoint
"""

from __future__ import annotations

import subprocess
import sys

MEASURE = r"""
import resource, sys, torch
import qwen_vl
from qwen_vl.model.loading import iter_tensors, weight_files
ckpt, method = sys.argv[1], sys.argv[2]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if method == "ours":
    model = qwen_vl.QWenLMHeadModel.from_pretrained(ckpt, torch_dtype=torch.float32)
else:
    config = qwen_vl.QWenConfig.from_pretrained(ckpt)
    model = qwen_vl.QWenLMHeadModel(config)
    state = {}
    for f in weight_files(ckpt):
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    del state
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
size = sum(p.numel() * p.element_size() for p in model.parameters())
print((after - before) * 1024, size)
"""


def peak_rise(ckpt: str, method: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", MEASURE, ckpt, method], capture_output=True, text=True, check=True)
    rise, size = map(int, out.stdout.split()[-2:])
    return rise, size


def main() -> None:
    ckpt = sys.argv[1] if len(sys.argv) > 1 else "../shared/golden/checkpoint"
    ours, size = peak_rise(ckpt, "ours")
    naive, _ = peak_rise(ckpt, "copy")
    mb = 1024 * 1024
    print(f"float32 model: {size / mb:.1f} MB")
    print(f"meta-device + mmap loader: peak RSS rise {ours / mb:.1f} MB ({ours / size:.2f}x model)")
    print(f"random init + state-dict copy: peak RSS rise {naive / mb:.1f} MB ({naive / size:.2f}x model)")
    print(f"ratio (copy / ours): {naive / ours:.2f}")


if __name__ == "__main__":
    main()

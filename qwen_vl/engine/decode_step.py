"""One decode step over the engine's KV cache, as pure tensor code that compiles.

The general forward (``model(ids, kv_cache=...)``) serves prefill and any caller;
it looks for image spans, builds masks from host-side lists and may take
different code paths per batch. A decode step needs none of that: every running
row adds exactly one real token, at its own slot and position. ``DecodeStep``
runs the model's own blocks on tensors only (ids, positions, slots, rotary
frequencies, the cache's validity mask), so ``torch.compile`` can trace the
whole step into one graph, and on CUDA replay it as a CUDA graph.

Modes:

- ``"eager"``: that tensor path without compilation.
- ``"compile"``: ``torch.compile`` (shapes made dynamic once they vary, so a
  second compilation covers every batch size and length). On CUDA it runs with
  ``mode="reduce-overhead"``
  (CUDA graphs, one recorded per shape): the batch is padded to a power of two
  and the attended length to a bucket (``bucket_length``), so a few graphs cover
  every step, and the cache tensors are marked as static addresses (not copied
  at each replay).
- ``"auto"``: ``"eager"`` for now, on every device. On CPU compilation does not
  pay; on an H200 the compiled step was 2.8x faster than eager for a tiny model
  but 3x slower at Qwen-VL-Chat's sizes (see docs/engine.md), so it stays opt-in.

If compiling or running the compiled step fails, the step logs the error once
and continues eagerly for good.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from ..model.attention_inputs import AttentionInputs
from ..model.rotary import cos_sin_from_inv_freq, logn_scale, rotary_inv_freq
from .kv_cache import KVCache

log = logging.getLogger(__name__)

DECODE_MODES = ("auto", "eager", "compile")


class _SlotWriter:
    """The ``kv_cache`` the attention layers see during a decode step: row i writes
    its new key/value at ``slots[i]`` and attends over the first ``span`` slots."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, span: int) -> None:
        self.keys, self.values, self.slots, self.span = keys, values, slots, span  # (L, B, H, S_max, D)
        self.rows = torch.arange(slots.shape[0], device=slots.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (n, H, 1, D); return keys/values (n, H, span, D)."""
        n = k.shape[0]
        keys, values = self.keys[layer], self.values[layer]  # (B, H, S_max, D)
        keys[self.rows, :, self.slots] = k[:, :, 0]  # (n, H, D) at one slot per row
        values[self.rows, :, self.slots] = v[:, :, 0]
        return keys[:n, :, : self.span], values[:n, :, : self.span]


def decode_forward(
    model,
    keys: torch.Tensor,  # (L, B, H, S_max, D), written in place
    values: torch.Tensor,  # (L, B, H, S_max, D), written in place
    valid: torch.Tensor,  # (B, S_max) bool: slots each row may attend
    ids: torch.Tensor,  # (n,) long
    positions: torch.Tensor,  # (n,) long
    slots: torch.Tensor,  # (n,) long: the cache slot each row writes
    inv_freq: torch.Tensor,  # (n, rot_dim/2) float32
    span: int,  # slots attended: [0, span)
) -> torch.Tensor:
    """Logits (n, vocab) for one new token per row, through the model's own blocks."""
    cfg = model.config
    transformer = model.transformer
    n = ids.shape[0]
    cos, sin = cos_sin_from_inv_freq(positions[:, None], inv_freq)  # (n, 1, 1, rot_dim)
    logn = logn_scale(positions[:, None], cfg.seq_length) if cfg.use_logn_attn else None  # (n, 1)
    mask = valid[:n, None, None, :span]  # (n, 1, 1, span)
    writer = _SlotWriter(keys, values, slots, span)
    inputs = AttentionInputs(cos=cos, sin=sin, logn=logn, mask=mask, is_causal=False, kv_cache=writer)
    h = transformer.wte(ids)[:, None]  # (n, 1, C)
    for block in transformer.h:
        h = block(h, inputs)
    return model.lm_head(transformer.ln_f(h[:, 0]))  # (n, vocab)


_compiled_forwards: dict[str, object] = {}


def compiled_decode_forward(cuda_graphs: bool):
    """``decode_forward`` under ``torch.compile``, built once per process and kind."""
    key = "cuda-graphs" if cuda_graphs else "dynamic"
    if key not in _compiled_forwards:
        mode = "reduce-overhead" if cuda_graphs else None  # reduce-overhead: CUDA graphs
        # dynamic=None: static first, dynamic once a shape varies (on an H200 this gave one
        # CUDA graph per shape where dynamic=True split each into two partitions).
        _compiled_forwards[key] = torch.compile(decode_forward, mode=mode, dynamic=None, fullgraph=True)
    return _compiled_forwards[key]


def bucket_length(span: int, minimum: int = 256) -> int:
    """``span`` rounded up to a multiple of ``minimum`` or of 1/8 of the next power of
    two, whichever is larger: 16 lengths up to 8192; under ``minimum`` or 25% extra slots."""
    step = max(minimum, (1 << (span - 1).bit_length()) // 8)
    return -(-span // step) * step


class DecodeStep:
    """Next-token logits for rows [0, n) of ``cache``, one token per row."""

    def __init__(self, model, cache: KVCache, mode: str = "auto", length_bucket: int = 256) -> None:
        if mode not in DECODE_MODES:
            raise ValueError(f"decode mode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
        self.model = model
        self.cache = cache
        self.config = model.config
        self.device = cache.valid.device
        if mode == "auto":
            mode = "eager"  # compile is opt-in until it is faster at real sizes (docs/engine.md)
        self.mode = mode
        self.cuda_graphs = mode == "compile" and self.device.type == "cuda"
        self.length_bucket = length_bucket
        self._inv_freq: OrderedDict[tuple[float, ...], torch.Tensor] = OrderedDict()
        self._compiled = None
        if mode == "compile":
            self._compiled = self._compile()

    def _compile(self):
        if self.cuda_graphs:
            for t in (self.cache.keys, self.cache.values, self.cache.valid):
                torch._dynamo.mark_static_address(t)
        return compiled_decode_forward(self.cuda_graphs)

    @property
    def compiled(self) -> bool:
        """True while the compiled step is in use (False after a fallback to eager)."""
        return self._compiled is not None

    @torch.no_grad()
    def __call__(self, last_ids: list[int]) -> torch.Tensor:
        """Feed ``last_ids[i]`` to row i (i < n); advance the rows; logits (n, vocab)."""
        c = self.cache
        n = len(last_ids)
        lengths = c.lengths[:n]
        if max(lengths) + 1 > c.max_length:
            raise ValueError(
                f"KV cache full: {max(lengths) + 1} tokens exceed its capacity of {c.max_length} per sequence"
            )
        rows_n, span = n, max(lengths) + 1
        if self.cuda_graphs:  # few distinct shapes -> few CUDA graphs
            rows_n = min(1 << (n - 1).bit_length(), c.batch_size)
            span = min(bucket_length(span, self.length_bucket), c.max_length)
        ids = torch.tensor(last_ids + [0] * (rows_n - n), dtype=torch.long).to(self.device, non_blocking=True)
        slots = torch.tensor(c.lengths[:rows_n], dtype=torch.long).to(self.device, non_blocking=True)
        positions = c.next_position[:rows_n]
        inv_freq = self._row_inv_freq(c.ntk_alphas[:rows_n])
        c.valid[torch.arange(rows_n, device=self.device), slots] = True

        logits = self._run(ids, positions, slots, inv_freq, span)[:n]
        c.next_position[:n] += 1
        for row in range(n):
            c.lengths[row] += 1
        return logits

    def _run(self, ids, positions, slots, inv_freq, span: int) -> torch.Tensor:
        c = self.cache
        args = (self.model, c.keys, c.values, c.valid, ids, positions, slots, inv_freq, span)
        if self._compiled is not None:
            try:
                if self.cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()  # outputs of the previous replay are done with
                out = self._compiled(*args)
                return out.clone() if self.cuda_graphs else out  # graph outputs are reused buffers
            except Exception as e:  # noqa: BLE001 - any compiler failure: stay correct, run eagerly
                log.warning("compiled decode step failed (%s: %s); continuing without compilation", type(e).__name__, e)
                self._compiled = None
        return decode_forward(*args)

    def _row_inv_freq(self, alphas: list[float]) -> torch.Tensor:
        """Rotary inverse frequencies (n, rot_dim/2) for rows with NTK factors ``alphas``."""
        key = tuple(alphas)
        table = self._inv_freq.get(key)
        if table is None:
            cfg = self.config
            per = {a: rotary_inv_freq(cfg.rotary_emb_base, a, cfg.rotary_dim, self.device) for a in set(alphas)}
            table = torch.stack([per[a] for a in alphas])
            self._inv_freq[key] = table
            while len(self._inv_freq) > 64:
                self._inv_freq.popitem(last=False)
        return table

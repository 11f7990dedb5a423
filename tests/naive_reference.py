"""A deliberately plain re-derivation of the Qwen language model's math, written
from the reference's description (golden README) with explicit loops, for
checking arbitrary configs where no golden file exists. Text only."""

from __future__ import annotations

import math

import torch


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def naive_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits (T, V) of one unpadded prompt, computed position by position."""
    cfg = model.config
    sd = {k: v.float() for k, v in model.state_dict().items()}
    T = len(ids)
    H, D = cfg.num_attention_heads, cfg.head_dim
    rot = cfg.rotary_dim
    alpha = 1.0
    if cfg.use_dynamic_ntk:
        alpha = max(2 ** math.ceil(math.log(T / cfg.seq_length, 2) + 1) - 1, 1)
    base = cfg.rotary_emb_base * alpha ** (rot / (rot - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, rot, 2).float() / rot))

    def rotate(v: torch.Tensor, p: int) -> torch.Tensor:  # v (H, D)
        out = v.clone()
        for i in range(rot // 2):
            angle = p * inv_freq[i]
            a, b = v[:, i].clone(), v[:, i + rot // 2].clone()
            out[:, i] = a * torch.cos(angle) - b * torch.sin(angle)
            out[:, i + rot // 2] = b * torch.cos(angle) + a * torch.sin(angle)
        return out

    x = sd["transformer.wte.weight"][torch.tensor(ids)]  # (T, C)
    bias = lambda name: sd.get(name, 0.0)  # noqa: E731
    for layer in range(cfg.num_hidden_layers):
        pre = f"transformer.h.{layer}."
        h = rms_norm(x, sd[pre + "ln_1.weight"], cfg.layer_norm_epsilon)
        qkv = h @ sd[pre + "attn.c_attn.weight"].T + sd[pre + "attn.c_attn.bias"]
        q, k, v = qkv.split(cfg.hidden_size, dim=-1)
        q, k, v = q.view(T, H, D), k.view(T, H, D), v.view(T, H, D)
        q = torch.stack([rotate(q[p], p) for p in range(T)])
        k = torch.stack([rotate(k[p], p) for p in range(T)])
        if cfg.use_logn_attn:
            for p in range(T):
                if p + 1 > cfg.seq_length:
                    q[p] = q[p] * (math.log(p + 1) / math.log(cfg.seq_length))
        out = torch.zeros(T, H, D)
        for p in range(T):
            for head in range(H):
                scores = (k[: p + 1, head] @ q[p, head]) / math.sqrt(D)
                out[p, head] = torch.softmax(scores, -1) @ v[: p + 1, head]
        x = x + out.reshape(T, -1) @ sd[pre + "attn.c_proj.weight"].T + bias(pre + "attn.c_proj.bias")
        h = rms_norm(x, sd[pre + "ln_2.weight"], cfg.layer_norm_epsilon)
        a1 = h @ sd[pre + "mlp.w1.weight"].T + bias(pre + "mlp.w1.bias")
        a2 = h @ sd[pre + "mlp.w2.weight"].T + bias(pre + "mlp.w2.bias")
        x = x + (a1 * torch.nn.functional.silu(a2)) @ sd[pre + "mlp.c_proj.weight"].T + bias(pre + "mlp.c_proj.bias")
    x = rms_norm(x, sd["transformer.ln_f.weight"], cfg.layer_norm_epsilon)
    return x @ sd["lm_head.weight"].T

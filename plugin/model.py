"""DiffusionGemma in plain torch, readable top to bottom: the reference every faster path is checked against.

One set of weights, two ways to run it:
- `encode(tokens, cache)`: the causal encoder. Appends the tokens' keys/values to the KV cache
  (sliding-window mask on local layers); each layer's output is scaled by its encoder scalar.
- `decode(canvas, cache, sc_probs)`: the bidirectional decoder over a canvas. Reads the cache without
  changing it (all of it on global layers, its last window-1 positions on sliding ones), adds the
  self-conditioning signal from the previous step's processed logits, and returns softcapped logits.
Global layers have no V projection (V is the raw K projection, normalised without weight) and use
proportional RoPE (the unrotated pairs carry a huge frequency divisor in `rope_freqs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Gemma-4 RMSNorm in float32: x / sqrt(mean(x²) + eps) · w (no "+1")."""
    xf = x.float()
    out = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        out = out * weight.float()
    return out.type_as(x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """x @ w^T for a float weight tensor, or a backend's weight object (e.g. quantized bytes on the GPU)
    that is callable on x."""
    return F.linear(x, w) if isinstance(w, torch.Tensor) else w(x)


def gelu_mlp(x: torch.Tensor, gate, up, down) -> torch.Tensor:
    return linear(F.gelu(linear(x, gate), approximate="tanh") * linear(x, up), down)


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [D]
    wq: torch.Tensor  # [H*hd, D]
    wk: torch.Tensor  # [KV*hd, D]
    wv: torch.Tensor | None  # [KV*hd, D]; None on global layers (V = K)
    wo: torch.Tensor  # [D, H*hd]
    q_norm: torch.Tensor  # [hd]
    k_norm: torch.Tensor  # [hd]
    post_attn_norm: torch.Tensor
    ffn_norm: torch.Tensor  # before the dense MLP
    ffn_gate: torch.Tensor  # [F, D]
    ffn_up: torch.Tensor
    ffn_down: torch.Tensor  # [D, F]
    post_ffw_norm_1: torch.Tensor  # after the dense MLP
    pre_ffw_norm_2: torch.Tensor  # before the experts
    router: torch.Tensor  # [E, D]
    router_scale: torch.Tensor  # [D]
    expert_scale: torch.Tensor  # [E]
    gate_up_exps: torch.Tensor  # [E, 2*Fe, D], gate half first
    down_exps: torch.Tensor  # [E, D, Fe]
    post_ffw_norm_2: torch.Tensor  # after the experts
    post_ffw_norm: torch.Tensor  # after dense + experts
    dec_scale: torch.Tensor  # [1]
    enc_scale: torch.Tensor  # [1]


@dataclass
class Weights:
    embed: torch.Tensor  # [V, D], also the (tied) head
    output_norm: torch.Tensor
    rope_freqs: torch.Tensor | None  # [hd_full/2] divisors of the global layers' frequencies
    sc_pre_norm: torch.Tensor
    sc_gate: torch.Tensor
    sc_up: torch.Tensor
    sc_down: torch.Tensor
    layers: list[LayerWeights]
    head: object = None  # the tied head as a backend weight object (quantized); None: F.linear with embed


@dataclass
class KVCache:
    """Keys/values of every encoded position, per layer: [B, KV, T, hd]."""

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    length: int = 0

    def layer(self, i: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (self.keys[i], self.values[i]) if i < len(self.keys) else (None, None)


class DiffusionGemma:
    def __init__(self, cfg: ModelConfig, w: Weights) -> None:
        self.cfg, self.w = cfg, w
        self.inv_freq = [self._inv_freq(i) for i in range(cfg.n_layer)]

    # ---- positions -----------------------------------------------------------------------------
    def _inv_freq(self, i: int) -> torch.Tensor:
        cfg = self.cfg
        hd = cfg.head_dim[i]
        base = cfg.rope_base_swa if cfg.is_swa[i] else cfg.rope_base
        inv = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))  # [hd/2]
        if not cfg.is_swa[i] and self.w.rope_freqs is not None:
            inv = inv / self.w.rope_freqs.float()  # proportional RoPE: pairs past the rotated part stand still
        return inv

    def rope(self, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) [L, hd] for every layer; computed once per layer kind."""
        by_kind: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, swa in enumerate(self.cfg.is_swa):
            if swa not in by_kind:
                freqs = positions.float()[:, None] * self.inv_freq[i].to(positions.device)[None, :]  # [L, hd/2]
                emb = torch.cat((freqs, freqs), dim=-1)  # [L, hd]
                by_kind[swa] = (emb.cos(), emb.sin())
        return [by_kind[swa] for swa in self.cfg.is_swa]

    # ---- blocks --------------------------------------------------------------------------------
    def attention(self, i: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache, *,
                  encoder: bool):
        """x: [B, L, D]; rope: this layer's (cos, sin) [L, hd]. Encoder: causal, appends to the cache.
        Decoder: bidirectional, cache read-only."""
        cfg, lw = self.cfg, self.w.layers[i]
        B, L, _ = x.shape
        hd, n_kv = cfg.head_dim[i], cfg.n_head_kv[i]
        cos, sin = rope
        q = linear(x, lw.wq).view(B, L, cfg.n_head, hd)
        q = rms_norm(q, lw.q_norm, cfg.rms_eps)
        q = (q * cos[:, None] + rotate_half(q) * sin[:, None]).transpose(1, 2)  # [B, H, L, hd]
        k_raw = linear(x, lw.wk).view(B, L, n_kv, hd)
        v = linear(x, lw.wv).view(B, L, n_kv, hd) if lw.wv is not None else k_raw
        k = rms_norm(k_raw, lw.k_norm, cfg.rms_eps)
        k = (k * cos[:, None] + rotate_half(k) * sin[:, None]).transpose(1, 2)  # [B, KV, L, hd]
        v = rms_norm(v, None, cfg.rms_eps).transpose(1, 2)  # [B, KV, L, hd]

        past_k, past_v = cache.layer(i)
        T = 0 if past_k is None else past_k.shape[2]
        if encoder:
            keys = k if past_k is None else torch.cat([past_k, k], dim=2)  # [B, KV, T+L, hd]
            values = v if past_v is None else torch.cat([past_v, v], dim=2)
            if i < len(cache.keys):
                cache.keys[i], cache.values[i] = keys, values
            else:
                cache.keys.append(keys)
                cache.values.append(values)
            q_pos = torch.arange(T, T + L, device=x.device)[:, None]  # [L, 1]
            k_pos = torch.arange(T + L, device=x.device)[None, :]  # [1, T+L]
            allowed = k_pos <= q_pos
            if cfg.is_swa[i]:
                allowed &= q_pos - k_pos < cfg.sliding_window
            mask = torch.zeros(L, T + L, device=x.device).masked_fill(~allowed, float("-inf"))  # [L, T+L]
        else:
            if past_k is not None and cfg.is_swa[i]:
                past_k, past_v = past_k[:, :, -(cfg.sliding_window - 1):], past_v[:, :, -(cfg.sliding_window - 1):]
            keys = k if past_k is None else torch.cat([past_k, k], dim=2)
            values = v if past_v is None else torch.cat([past_v, v], dim=2)
            mask = None
        groups = cfg.n_head // n_kv  # query heads h = kv * groups + g share KV head kv
        q = q.reshape(B, n_kv, groups * L, hd)  # [B, KV, G*L, hd]
        scores = q @ keys.transpose(2, 3)  # [B, KV, G*L, S]; Gemma 4 attention scale is 1.0
        if mask is not None:
            scores = scores + mask.repeat(groups, 1)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = (probs @ values).view(B, cfg.n_head, L, hd).transpose(1, 2).reshape(B, L, cfg.n_head * hd)
        return linear(out, lw.wo)

    def moe(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Routed experts on the residual stream h: [B, L, D] -> [B, L, D]."""
        cfg, lw = self.cfg, self.w.layers[i]
        flat = h.reshape(-1, cfg.n_embd)  # [N, D]
        r = rms_norm(flat, None, cfg.rms_eps) * lw.router_scale * cfg.n_embd**-0.5
        probs = torch.softmax(linear(r, lw.router), dim=-1, dtype=torch.float32)  # [N, E]
        top_w, top_i = torch.topk(probs, k=cfg.n_expert_used, dim=-1)  # [N, K]
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        top_w = top_w * lw.expert_scale[top_i]
        x = rms_norm(flat, lw.pre_ffw_norm_2, cfg.rms_eps)  # [N, D]
        # group the N*K (token, expert) assignments by expert, then one GEMM pair per expert used
        order = torch.argsort(top_i.flatten(), stable=True)  # [N*K]
        rows = order // cfg.n_expert_used
        weights = top_w.flatten()[order]
        counts = torch.bincount(top_i.flatten(), minlength=cfg.n_expert).tolist()
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            r = rows[start : start + n]
            gate, up = linear(x[r], lw.gate_up_exps[e]).chunk(2, dim=-1)  # [n, Fe] each
            y = linear(F.gelu(gate, approximate="tanh") * up, lw.down_exps[e])  # [n, D]
            out.index_add_(0, r, y * weights[start : start + n, None])
            start += n
        return out.view_as(h)

    def layer(self, i: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache, *,
              encoder: bool):
        cfg, lw = self.cfg, self.w.layers[i]
        a = self.attention(i, rms_norm(x, lw.attn_norm, cfg.rms_eps), rope, cache, encoder=encoder)
        h = x + rms_norm(a, lw.post_attn_norm, cfg.rms_eps)
        dense = gelu_mlp(rms_norm(h, lw.ffn_norm, cfg.rms_eps), lw.ffn_gate, lw.ffn_up, lw.ffn_down)
        ffn = rms_norm(dense, lw.post_ffw_norm_1, cfg.rms_eps) + rms_norm(self.moe(i, h), lw.post_ffw_norm_2, cfg.rms_eps)
        out = h + rms_norm(ffn, lw.post_ffw_norm, cfg.rms_eps)
        return out * (lw.enc_scale if encoder else lw.dec_scale)

    # ---- the two passes ----------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.w.embed[tokens] * torch.tensor(self.cfg.embed_scale, dtype=self.w.embed.dtype)  # [B, L, D]

    @torch.no_grad()
    def encode(self, tokens: torch.Tensor, cache: KVCache) -> None:
        """tokens: [B, L] at positions cache.length.. ; fills the cache."""
        rope = self.rope(torch.arange(cache.length, cache.length + tokens.shape[1], device=tokens.device))
        x = self.embed(tokens)
        for i in range(self.cfg.n_layer):
            x = self.layer(i, x, rope[i], cache, encoder=True)
        cache.length += tokens.shape[1]

    def self_conditioning(self, x: torch.Tensor, sc_probs: torch.Tensor | None) -> torch.Tensor:
        """Decoder input: weightless RMSNorm(embedding + MLP(RMSNorm(sc_probs @ E · √D))), where sc_probs is
        softmax of the previous step's processed logits (None on the first step: no signal)."""
        w = self.w
        if sc_probs is None:
            soft = torch.zeros_like(x)
        else:
            soft = (sc_probs.to(w.embed.dtype) @ w.embed) * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)  # [B, L, D]
        signal = gelu_mlp(rms_norm(soft, w.sc_pre_norm, self.cfg.rms_eps), w.sc_gate, w.sc_up, w.sc_down)
        return rms_norm(x + signal, None, self.cfg.rms_eps)

    @torch.no_grad()
    def decode(self, canvas: torch.Tensor, cache: KVCache, sc_probs: torch.Tensor | None = None) -> torch.Tensor:
        """canvas: [B, C] token ids; sc_probs: [B, C, V] softmax of the previous step's processed logits, or
        None. Returns softcapped float32 logits [B, C, V]."""
        rope = self.rope(torch.arange(cache.length, cache.length + canvas.shape[1], device=canvas.device))
        x = self.self_conditioning(self.embed(canvas), sc_probs)
        for i in range(self.cfg.n_layer):
            x = self.layer(i, x, rope[i], cache, encoder=False)
        x = rms_norm(x, self.w.output_norm, self.cfg.rms_eps)
        logits = linear(x, self.w.head if self.w.head is not None else self.w.embed).float()  # [B, C, V]
        if self.cfg.softcap:
            logits = torch.tanh(logits / self.cfg.softcap) * self.cfg.softcap
        return logits

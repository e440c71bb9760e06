"""DiffusionGemma in plain torch, readable top to bottom: the reference every faster path is checked against.

One set of weights, two ways to run it:
- `encode(tokens, cache)`: the causal encoder. Appends the tokens' keys/values to the KV cache
  (sliding-window mask on local layers); each layer's output is scaled by its encoder scalar.
- `decode(canvas, cache, sc_probs)`: the bidirectional decoder over a canvas. Attends over the cache
  (all of it on global layers, its last window-1 positions on sliding ones) without changing what it
  holds (the canvas's own keys/values go into room reserved after it, KVCache.reserve), adds the
  self-conditioning signal from the previous step's processed logits, and returns softcapped logits.
Global layers have no V projection (V is the raw K projection, normalised without weight) and use
proportional RoPE (the unrotated pairs carry a huge frequency divisor in `rope_freqs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .kv_cache import KVCache


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Gemma-4 RMSNorm in float32: x / sqrt(mean(x²) + eps) · w (no "+1")."""
    # torch's rms_norm computes exactly x * rsqrt(mean(x * x) + eps) * w (bit for bit), in fewer dispatches
    w = None if weight is None else weight.float()
    return F.rms_norm(x.float(), (x.shape[-1],), w, eps).type_as(x)  # x.float(): the same tensor on float32


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x · cos + rotate_half(x) · sin, with rotate_half(x) = [-x2, x1] written as roll(x) · [-sin1, sin2]
    (the same products, the sign moved onto sin: bit-identical, four ops instead of seven).
    x: [B, L, H, hd]; cos, sin_signed: [L, hd]."""
    return x * cos[:, None] + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed[:, None]


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """x @ w^T for a float weight tensor, or a backend's weight object (e.g. quantized bytes on the GPU)
    that is callable on x."""
    return F.linear(x, w) if isinstance(w, torch.Tensor) else w(x)


def geglu(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) · up from [..., 2F] (gate half first) -> [..., F]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def gelu_mlp(x: torch.Tensor, gate, up, down, gate_up: torch.Tensor | None = None) -> torch.Tensor:
    """down(gelu_tanh(gate(x)) · up(x)); gate_up: the [2F, D] rows of both, for one GEMM instead of two."""
    if gate_up is not None:
        g, u = F.linear(x, gate_up).chunk(2, dim=-1)
    else:
        g, u = linear(x, gate), linear(x, up)
    return linear(F.gelu(g, approximate="tanh") * u, down)


# Below this many FLOPs for all experts on all tokens, the CPU path runs every expert on every token in
# one batched GEMM pair (unrouted pairs weighted 0) instead of a GEMM pair per used expert: at tiny sizes
# the per-expert loop's ~10 ops each cost more than the extra arithmetic (bench/engine_cpu.py).
DENSE_MOE_MAX_FLOP = 4e6


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of q [B, H, L, hd] over keys/values [B, KV, S, hd] (query heads h = kv * G + g share KV head
    kv, G = H / KV; Gemma 4's scale is 1.0), mask [L, S] bool (True: attend) or None. Each KV head's G query
    heads are folded into its rows, q -> [B, KV, G * L, hd] (the mask repeated G times), which is exactly
    SDPA with enable_gqa; but on a GPU the fused kernels take the folded form while they refuse grouped
    heads in float32 or at head dim 512 (mem-efficient attention has no GQA, flash attention wants 16-bit
    and head dim <= 256), and SDPA would fall back to its math kernel, which repeats K/V per query head and
    writes the [H, L, S] scores: 4 GB per layer for an 8K prompt in float32 (torch 2.11's rules; newer
    torch lets mem-efficient attention take GQA, and the fold stays exact there). Returns [B, H, L, hd]."""
    B, H, L, hd = q.shape
    if keys.shape[1] != values.shape[1] or H % keys.shape[1] or (mask is not None and mask.dim() != 2):
        raise ValueError(f"grouped_attention: {H} query heads need K and V with one head count dividing it, and the "
                         f"mask [L, S] (got K {tuple(keys.shape)}, V {tuple(values.shape)}, mask "
                         f"{None if mask is None else tuple(mask.shape)})")
    G = H // keys.shape[1]
    folded = q.reshape(B, keys.shape[1], G * L, hd)  # [B, KV, G*L, hd]
    if mask is not None:  # the additive bias SDPA would make of the bool mask, made once, then its G copies
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))  # [L, S]
        mask = bias.repeat(G, 1)  # [G*L, S]: no [G*L, S] bool copy beside it (35 MB at an 8K prompt's global layer)
    return F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=1.0).reshape(B, H, L, hd)


def dense_moe(cfg: ModelConfig, n_tokens: int) -> bool:
    """Whether every expert runs on every token (see DENSE_MOE_MAX_FLOP)."""
    return 6 * n_tokens * cfg.n_expert * cfg.n_ff_exp * cfg.n_embd <= DENSE_MOE_MAX_FLOP


def routing_weights(top_w: torch.Tensor, top_i: torch.Tensor, expert_scale: torch.Tensor) -> torch.Tensor:
    """The chosen experts' weights [N, K]: top-k router probabilities renormalised, times each expert's scale."""
    return top_w / top_w.sum(dim=-1, keepdim=True) * expert_scale[top_i]


def dense_experts(gate_up: torch.Tensor, top_w: torch.Tensor, top_i: torch.Tensor, expert_scale: torch.Tensor,
                  down_flat: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, unrouted pairs weighted 0. gate_up: [N, E*2Fe] (x times every expert's
    gate/up rows, gate half first per expert); down_flat: [D, E*Fe] (LayerWeights.dense_moe_weights).
    Each expert's hidden units are scaled by its routing weight, so one GEMM sums the weighted outputs."""
    N, E = gate_up.shape[0], expert_scale.shape[0]
    # routing_weights scattered to [N, E], in fewer calls: scatter first, then scale every column
    routed = torch.zeros(N, E, dtype=top_w.dtype, device=top_w.device).scatter_(1, top_i, top_w)
    routed = routed * (expert_scale / top_w.sum(dim=-1, keepdim=True))  # [N, E]
    gate, up = gate_up.view(N, E, 2, -1).unbind(2)  # [N, E, Fe] each
    hidden = F.gelu(gate, approximate="tanh") * up * routed.to(gate.dtype)[:, :, None]
    return linear(hidden.reshape(N, -1), down_flat)  # [N, D]


def grouped_experts(x: torch.Tensor, top_w: torch.Tensor, top_i: torch.Tensor, expert_scale: torch.Tensor,
                    gate_up_exps, down_exps) -> torch.Tensor:
    """The chosen experts only: the N*K (token, expert) assignments grouped by expert, then one GEMM pair
    per expert used, weighted by routing_weights. x: [N, D]; top_w, top_i: [N, K] (router top-k);
    gate_up_exps: [E, 2Fe, D] (gate half first); down_exps: [E, D, Fe]. Returns [N, D]."""
    top_w = routing_weights(top_w, top_i, expert_scale)
    K, E = top_i.shape[1], expert_scale.shape[0]
    order = torch.argsort(top_i.flatten(), stable=True)  # [N*K]
    rows = order // K
    weights = top_w.flatten()[order]
    flat_i = top_i.flatten()
    counts = torch.zeros(E, dtype=torch.int64, device=flat_i.device).scatter_add_(0, flat_i, torch.ones_like(flat_i))  # [E]
    # (not torch.bincount: on a GPU it reads the largest id back to the host, which a CUDA graph cannot hold)
    if hasattr(gate_up_exps, "grouped"):  # a backend's expert weights that run every expert in one launch
        return gate_up_exps.grouped(x, rows, weights, counts, down_exps)
    counts = counts.tolist()
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        r = rows[start : start + n]
        y = linear(geglu(linear(x[r], gate_up_exps[e])), down_exps[e])  # [n, D]
        out.index_add_(0, r, y * weights[start : start + n, None])
        start += n
    return out


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
    # set by fuse_projections() when the matrices are plain tensors: one GEMM instead of three / two
    wqkv: torch.Tensor | None = None  # [(H + 2*KV)*hd, D] rows of wq, wk, wv (global layers: wk twice, V = K)
    qkv_norm: torch.Tensor | None = None  # [H + 2*KV, hd] q_norm per q head, k_norm per k head, ones for v
    ffn_gate_up: torch.Tensor | None = None  # [2F, D] rows of ffn_gate, ffn_up (views of it)
    down_exps_flat: torch.Tensor | None = None  # [D, E*Fe]: every expert's down matrix side by side (dense MoE path)

    def fuse_projections(self) -> None:
        """Concatenate Q/K/V and the dense gate/up rows into one matrix each and make the separate weights
        views of it (no extra memory). Skipped for backend weight objects (quantized GPU weights)."""
        qkv = [self.wq, self.wk, self.wk if self.wv is None else self.wv]
        if all(isinstance(w, torch.Tensor) for w in qkv) and self.wqkv is None:
            self.wqkv = torch.cat(qkv)
            parts = self.wqkv.split([w.shape[0] for w in qkv])
            self.wq, self.wk = parts[0], parts[1]
            self.wv = parts[2] if self.wv is not None else None
            hd = self.q_norm.shape[0]
            n_q, n_kv = self.wq.shape[0] // hd, self.wk.shape[0] // hd
            self.qkv_norm = torch.cat([self.q_norm.expand(n_q, hd), self.k_norm.expand(n_kv, hd),
                                       torch.ones(n_kv, hd, dtype=self.q_norm.dtype, device=self.q_norm.device)])
        if isinstance(self.ffn_gate, torch.Tensor) and isinstance(self.ffn_up, torch.Tensor) and self.ffn_gate_up is None:
            self.ffn_gate_up = torch.cat([self.ffn_gate, self.ffn_up])
            self.ffn_gate, self.ffn_up = self.ffn_gate_up.split([self.ffn_gate.shape[0], self.ffn_up.shape[0]])

    def dense_moe_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [E*2Fe, D], down [D, E*Fe]) for running all experts as two plain GEMMs: the first is a
        view of gate_up_exps, the second a copy made on first use (only models small enough for the dense
        path ever make it)."""
        E, two_fe, D = self.gate_up_exps.shape
        if self.down_exps_flat is None:
            self.down_exps_flat = self.down_exps.permute(1, 0, 2).reshape(D, -1).contiguous()
        return self.gate_up_exps.view(E * two_fe, D), self.down_exps_flat


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


class DiffusionGemma:
    def __init__(self, cfg: ModelConfig, w: Weights) -> None:
        self.cfg, self.w = cfg, w
        for lw in w.layers:
            lw.fuse_projections()  # plain tensors only; backend weight objects stay as they are
        self.inv_freq = [self._inv_freq(i) for i in range(cfg.n_layer)]
        self._rope_key: tuple | None = None  # the decoder's steps on one canvas share their positions
        self._rope: list[tuple[torch.Tensor, torch.Tensor]] = []

    # ---- positions -----------------------------------------------------------------------------
    def _inv_freq(self, i: int) -> torch.Tensor:
        cfg = self.cfg
        hd = cfg.head_dim[i]
        base = cfg.rope_base_swa if cfg.is_swa[i] else cfg.rope_base
        inv = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))  # [hd/2]
        if not cfg.is_swa[i] and self.w.rope_freqs is not None:
            inv = inv / self.w.rope_freqs.float()  # proportional RoPE: pairs past the rotated part stand still
        return inv

    def rope(self, start: int, length: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin_signed) [L, hd] for positions start..start+L-1 and every layer, sin_signed = [-sin1, sin2]
        (see apply_rope); computed once per layer kind and kept for the next call with the same positions."""
        key = (start, length, str(device))
        if key != self._rope_key:
            positions = torch.arange(start, start + length, device=device)
            by_kind: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
            for i, swa in enumerate(self.cfg.is_swa):
                if swa not in by_kind:
                    freqs = positions.float()[:, None] * self.inv_freq[i].to(device)[None, :]  # [L, hd/2]
                    emb = torch.cat((freqs, freqs), dim=-1)  # [L, hd]
                    sin = emb.sin()
                    half = sin.shape[-1] // 2
                    by_kind[swa] = (emb.cos(), torch.cat((-sin[:, :half], sin[:, half:]), dim=-1))
            self._rope_key, self._rope = key, [by_kind[swa] for swa in self.cfg.is_swa]
        return self._rope

    # ---- blocks --------------------------------------------------------------------------------
    def attention(self, i: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache, *,
                  encoder: bool):
        """x: [B, L, D]; rope: this layer's (cos, sin) [L, hd]. Encoder: causal, appends to the cache.
        Decoder: bidirectional; the cached positions are left as they are (KVCache.with_canvas)."""
        cfg, lw = self.cfg, self.w.layers[i]
        B, L, _ = x.shape
        H, hd, n_kv, eps = cfg.n_head, cfg.head_dim[i], cfg.n_head_kv[i], cfg.rms_eps
        cos, sin = rope
        if lw.wqkv is not None:  # plain tensors: one GEMM, one norm and one rotation for all heads
            qkv = rms_norm(linear(x, lw.wqkv).view(B, L, H + 2 * n_kv, hd), None, eps) * lw.qkv_norm  # [B, L, H+2KV, hd]
            qk = apply_rope(qkv[:, :, : H + n_kv], cos, sin)
            q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + n_kv :]
        else:
            q = apply_rope(rms_norm(linear(x, lw.wq).view(B, L, H, hd), lw.q_norm, eps), cos, sin)  # [B, L, H, hd]
            k_raw = linear(x, lw.wk).view(B, L, n_kv, hd)
            v = linear(x, lw.wv).view(B, L, n_kv, hd) if lw.wv is not None else k_raw  # global layers: V = K
            k = apply_rope(rms_norm(k_raw, lw.k_norm, eps), cos, sin)  # [B, L, KV, hd]
            v = rms_norm(v, None, eps)  # V is normalised without a weight
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, L, hd]

        if encoder:
            keys, values = cache.extend(i, k, v, cfg.sliding_window - 1 if cfg.is_swa[i] else None)  # [B, KV, P+L, hd]
            P = keys.shape[2] - L  # cached positions: cache.length - P .. cache.length - 1
            T = cache.length  # absolute position of the first query
            q_pos = torch.arange(T, T + L, device=x.device)[:, None]  # [L, 1]
            k_pos = torch.arange(T - P, T + L, device=x.device)[None, :]  # [1, P+L]
            mask = k_pos <= q_pos  # [L, P+L], True: attend
            if cfg.is_swa[i]:
                mask &= q_pos - k_pos < cfg.sliding_window
        else:  # the cache holds what the canvas sees: every position on global layers, the window on sliding ones
            keys, values = cache.with_canvas(i, k, v)  # [B, KV, P+L, hd] in the cache's attention dtype
            mask = None
        out = grouped_attention(q.to(keys.dtype), keys, values, mask).to(q.dtype)  # [B, H, L, hd]
        return linear(out.transpose(1, 2).reshape(B, L, H * hd), lw.wo)

    def moe(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Routed experts on the residual stream h: [B, L, D] -> [B, L, D]."""
        cfg, lw = self.cfg, self.w.layers[i]
        flat = h.reshape(-1, cfg.n_embd)  # [N, D]
        normed = rms_norm(flat, None, cfg.rms_eps)  # [N, D]: the router's input and, weighted, the experts'
        r = normed * lw.router_scale * cfg.n_embd**-0.5
        probs = torch.softmax(linear(r, lw.router), dim=-1, dtype=torch.float32)  # [N, E]
        top_w, top_i = torch.topk(probs, k=cfg.n_expert_used, dim=-1)  # [N, K]
        x = normed * lw.pre_ffw_norm_2.to(normed.dtype)  # [N, D]
        if isinstance(lw.gate_up_exps, torch.Tensor) and dense_moe(cfg, flat.shape[0]):
            gate_up, down = lw.dense_moe_weights()
            return dense_experts(linear(x, gate_up), top_w, top_i, lw.expert_scale, down).view_as(h)
        return grouped_experts(x, top_w, top_i, lw.expert_scale, lw.gate_up_exps, lw.down_exps).view_as(h)

    def layer(self, i: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache, *,
              encoder: bool):
        cfg, lw = self.cfg, self.w.layers[i]
        a = self.attention(i, rms_norm(x, lw.attn_norm, cfg.rms_eps), rope, cache, encoder=encoder)
        h = x + rms_norm(a, lw.post_attn_norm, cfg.rms_eps)
        dense = gelu_mlp(rms_norm(h, lw.ffn_norm, cfg.rms_eps), lw.ffn_gate, lw.ffn_up, lw.ffn_down, lw.ffn_gate_up)
        ffn = rms_norm(dense, lw.post_ffw_norm_1, cfg.rms_eps) + rms_norm(self.moe(i, h), lw.post_ffw_norm_2, cfg.rms_eps)
        out = h + rms_norm(ffn, lw.post_ffw_norm, cfg.rms_eps)
        return out * (lw.enc_scale if encoder else lw.dec_scale)

    # ---- the two passes ----------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rows of the embedding (a tensor, or a backend's quantized table indexed the same way) times √D."""
        return self.w.embed[tokens] * torch.tensor(self.cfg.embed_scale, dtype=self.w.embed.dtype)  # [B, L, D]

    @torch.inference_mode()
    def encode(self, tokens: torch.Tensor, cache: KVCache, chunk: int | None = None) -> torch.Tensor:
        """tokens: [B, L] at positions cache.length.. ; fills the cache, `chunk` tokens per pass at most (None:
        all at once): each pass attends over the cache the earlier ones filled, which bounds the attention's
        and the experts' working memory by the chunk instead of the prompt. Returns the last layer's output
        [B, L, D] (`head` of it: the causal next-token logits, for diagnostics)."""
        cache.until = max(cache.until, cache.length + tokens.shape[1])  # before the chunks: KVCache.extend
        if chunk is not None and tokens.shape[1] > chunk:
            return torch.cat([self.encode(part, cache) for part in tokens.split(chunk, dim=1)], dim=1)
        rope = self.rope(cache.length, tokens.shape[1], tokens.device)
        x = self.embed(tokens)
        for i in range(self.cfg.n_layer):
            x = self.layer(i, x, rope[i], cache, encoder=True)
        cache.length += tokens.shape[1]
        return x

    def soft_embedding(self, sc_probs: torch.Tensor) -> torch.Tensor:
        """sc_probs [B, C, V] (softmax of the previous step's processed logits) @ E -> [B, C, D]."""
        e = self.w.embed
        return sc_probs.to(e.dtype) @ e if isinstance(e, torch.Tensor) else e.weighted_sum(sc_probs)

    def self_conditioning(self, x: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
        """Decoder input: weightless RMSNorm(embedding + MLP(RMSNorm(soft · √D))), where soft = softmax(the
        previous step's processed logits) @ E (None on the first step: no signal)."""
        w = self.w
        if soft is None:
            soft = torch.zeros_like(x)
        else:
            soft = soft.to(x.dtype) * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)  # [B, L, D]
        signal = gelu_mlp(rms_norm(soft, w.sc_pre_norm, self.cfg.rms_eps), w.sc_gate, w.sc_up, w.sc_down)
        return rms_norm(x + signal, None, self.cfg.rms_eps)

    @torch.inference_mode()
    def decode_hidden(self, canvas: torch.Tensor, cache: KVCache, soft: torch.Tensor | None = None) -> torch.Tensor:
        """canvas: [B, C] token ids; soft: [B, C, D] the self-conditioning soft embedding or None. Returns
        the last layer's output [B, C, D]."""
        rope = self.rope(cache.length, canvas.shape[1], canvas.device)
        x = self.self_conditioning(self.embed(canvas), soft)
        for i in range(self.cfg.n_layer):
            x = self.layer(i, x, rope[i], cache, encoder=False)
        return x

    @torch.inference_mode()
    def decode(self, canvas: torch.Tensor, cache: KVCache, sc_probs: torch.Tensor | None = None) -> torch.Tensor:
        """canvas: [B, C] token ids; sc_probs: [B, C, V] softmax of the previous step's processed logits, or
        None. Returns softcapped float32 logits [B, C, V]."""
        soft = None if sc_probs is None else self.soft_embedding(sc_probs)
        return self.head(self.decode_hidden(canvas, cache, soft))

    @torch.inference_mode()
    def decode_stats(self, canvas: torch.Tensor, cache: KVCache, soft: torch.Tensor | None, temperature: float,
                     seed: int, index: int):
        """The sampler's statistics of one pass over a canvas [1, C] without the [C, V] logits where the head
        is a backend object with `stats` (the cuda backend's fused head, csrc/head.cu): per position max,
        argmax, lse, entropy of softcap(logits) / temperature, the Gumbel-max sample of (seed, index) and
        sc = softmax @ E [C, D], the next pass's `soft`. Plain weights: plugin/cuda/head_ref.py's full-logits
        reference. Returns plugin.cuda.head_ref.HeadStats."""
        return self.hidden_stats(self.decode_hidden(canvas, cache, soft), temperature, seed, index)

    @torch.inference_mode()
    def hidden_stats(self, hidden: torch.Tensor, temperature: float, seed: int, index: int):
        """decode_stats from the last layer's output hidden [1, C, D] (decode_hidden's, or a CUDA graph's
        replay of it: plugin/cuda/graph.py)."""
        x = rms_norm(hidden, self.w.output_norm, self.cfg.rms_eps)[0]  # [C, D]
        if hasattr(self.w.head, "stats"):
            return self.w.head.stats(x, self.cfg.softcap, temperature, seed, index)
        from .cuda.head_ref import head_stats_reference

        return head_stats_reference(x, self.w.embed, self.cfg.softcap, temperature, seed, index)

    def head_rows(self, hidden: torch.Tensor):
        """The softcapped logits of a few positions at a time of a last-layer output hidden [1, C, D], formed
        when asked: positions (a slice) -> [r, V] (plugin/sampler.RowLogits, for logprobs and JSON mode)."""
        return lambda rows: self.head(hidden[:, rows])[0]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Softcapped float32 logits [B, L, V] of the last layer's output x [B, L, D] (tied embedding)."""
        x = rms_norm(x, self.w.output_norm, self.cfg.rms_eps)
        logits = linear(x, self.w.head if self.w.head is not None else self.w.embed).float()  # [B, L, V]
        if self.cfg.softcap:
            logits = torch.tanh(logits / self.cfg.softcap) * self.cfg.softcap
        return logits

"""The decoder step of small models in fewer torch calls: the CPU fast path beside model.py's reference.

At the smallest sizes (the test fixtures, bench/engine_cpu.py's tiny model) a denoising step is a few
hundred tiny tensor operations, and each costs a few microseconds of dispatch whatever its size.
`FastDecoder` computes exactly what `DiffusionGemma.decode` computes (tests/test_fast_decode.py: 1e-5)
with fewer of them, by preparing the weights once at load:
- the per-channel weights that meet a GEMM first are folded into its columns: attn_norm into Q/K/V,
  ffn_norm into the dense gate/up, pre_ffw_norm_2 into the experts' gate/up, router_scale·D^-0.5 into the
  router, sc_pre_norm into the self-conditioning gate/up, output_norm and 1/softcap into a head copy;
- one weightless RMSNorm of the residual feeds one GEMM for the dense gate/up, the router and (for tiny
  expert shapes) every expert's gate/up, whose routed outputs then sum in one GEMM over all experts;
- the dense and expert branches' post-norms run as one norm over both, stacked;
- the embedding is kept pre-multiplied by √D, for the canvas and for the self-conditioning input.
It runs where the whole step is small (`FAST_DECODE_MAX_FLOP`) and the weights are plain tensors; the
copies it keeps (the scaled embedding and head, the flat expert down matrices) are then small too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .kv_cache import KVCache
from .model import DiffusionGemma, dense_experts, dense_moe, grouped_experts

# Above this many matmul FLOPs per denoising step the GEMMs dominate and the fold-ups stop paying for
# their extra weight copies (measured, 2 threads): bench/engine_cpu.py's tiny model (8 MFLOP) and the test
# fixtures take this path; the bundled default model (0.1 GFLOP: 3-5% slower here than model.decode, its
# weight copies cost more cache than the saved calls) and the bench's "small" model (0.9 GFLOP) do not.
FAST_DECODE_MAX_FLOP = 5e7


@dataclass
class _Layer:
    wqkv: torch.Tensor  # [(H + 2*KV)*hd, D], attn_norm folded in
    qkv_norm: torch.Tensor  # [H + 2*KV, hd]
    wo: torch.Tensor  # [D, H*hd]
    post_attn_norm: torch.Tensor  # [D]
    w_in: torch.Tensor  # [2F + E (+ E*2Fe), D]: dense gate/up, router, experts' gate/up when dense
    splits: list[int]
    ffn_down: torch.Tensor  # [D, F]
    dense_experts: bool  # every expert on every canvas token (tiny expert shapes)
    gate_up_exps: torch.Tensor  # [E, 2Fe, D], pre_ffw_norm_2 folded in (the grouped path's weights)
    down_exps: torch.Tensor  # [E, D, Fe]
    down_flat: torch.Tensor | None  # [D, E*Fe] (the dense path's)
    expert_scale: torch.Tensor  # [E]
    post_ffw_norms: torch.Tensor  # [2, 1, D]: post_ffw_norm_1 (dense), post_ffw_norm_2 (experts)
    post_ffw_norm: torch.Tensor  # [D]
    dec_scale: torch.Tensor  # [1]


class FastDecoder:
    """`decode(canvas, cache, sc_probs)` with the signature and result of `DiffusionGemma.decode`."""

    def __init__(self, model: DiffusionGemma) -> None:
        self.model, self.cfg = model, model.cfg
        w, cfg = model.w, model.cfg
        scale = torch.tensor(cfg.embed_scale, dtype=w.embed.dtype)
        self.embed = w.embed * scale  # [V, D]
        self.head = w.embed * w.output_norm / (cfg.softcap or 1.0)  # [V, D]
        self.sc_gate_up = torch.cat([w.sc_gate, w.sc_up]) * w.sc_pre_norm  # [2F, D]
        self.sc_down = w.sc_down
        self.layers = [self._prepare(lw, cfg) for lw in w.layers]
        self._rope_key: tuple | None = None
        self._rope: list[tuple[torch.Tensor, torch.Tensor]] = []

    @staticmethod
    def supports(model: DiffusionGemma) -> bool:
        w, cfg = model.w, model.cfg
        plain = w.head is None and all(lw.wqkv is not None and lw.ffn_gate_up is not None
                                       and isinstance(lw.gate_up_exps, torch.Tensor) for lw in w.layers)
        return (plain and w.embed.device.type == "cpu" and w.embed.dtype == torch.float32
                and cfg.decode_flops_per_token * cfg.canvas_length <= FAST_DECODE_MAX_FLOP)

    @staticmethod
    def _prepare(lw, cfg: ModelConfig) -> _Layer:
        D = cfg.n_embd
        dense = dense_moe(cfg, cfg.canvas_length)
        gate_up_exps = lw.gate_up_exps * lw.pre_ffw_norm_2  # [E, 2Fe, D]
        w_in = [lw.ffn_gate_up * lw.ffn_norm, lw.router * lw.router_scale * D**-0.5]
        if dense:
            w_in.append(gate_up_exps.reshape(-1, D))
        return _Layer(
            wqkv=lw.wqkv * lw.attn_norm, qkv_norm=lw.qkv_norm, wo=lw.wo, post_attn_norm=lw.post_attn_norm,
            w_in=torch.cat(w_in), splits=[w.shape[0] for w in w_in], ffn_down=lw.ffn_down, dense_experts=dense,
            gate_up_exps=gate_up_exps, down_exps=lw.down_exps,
            down_flat=lw.dense_moe_weights()[1] if dense else None,
            expert_scale=lw.expert_scale, post_ffw_norms=torch.stack([lw.post_ffw_norm_1, lw.post_ffw_norm_2])[:, None],
            post_ffw_norm=lw.post_ffw_norm, dec_scale=lw.dec_scale,
        )

    def rope(self, start: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The model's (cos, sin_signed) per layer, as [L, 1, hd] to broadcast over heads."""
        key = (start, length)
        if key != self._rope_key:
            self._rope_key = key
            self._rope = [(c[:, None], s[:, None]) for c, s in self.model.rope(start, length, torch.device("cpu"))]
        return self._rope

    def norm(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.cfg.rms_eps)

    def layer(self, i: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache) -> torch.Tensor:
        cfg, lw = self.cfg, self.layers[i]
        B, L, D = x.shape
        H, hd, n_kv = cfg.n_head, cfg.head_dim[i], cfg.n_head_kv[i]
        cos, sin = rope
        # attention: as DiffusionGemma.attention(encoder=False)
        qkv = self.norm(F.linear(self.norm(x), lw.wqkv).view(B, L, H + 2 * n_kv, hd)) * lw.qkv_norm  # [B, L, H+2KV, hd]
        qk = qkv[:, :, : H + n_kv]
        qk = qk * cos + qk.roll(hd // 2, dims=-1) * sin
        q, k, v = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), qkv[:, :, H + n_kv :].transpose(1, 2)
        k, v = cache.with_canvas(i, k, v)  # [B, KV, T+L, hd]; sliding layers' cache is trimmed to the window
        a = F.scaled_dot_product_attention(q.to(k.dtype), k, v, scale=1.0, enable_gqa=True).to(q.dtype)  # [B, H, L, hd]
        h = x + self.norm(F.linear(a.transpose(1, 2).reshape(B, L, H * hd), lw.wo), lw.post_attn_norm)  # [B, L, D]
        # dense MLP and experts from one normalised residual and one GEMM
        n = self.norm(h).view(B * L, D)  # [N, D]
        parts = F.linear(n, lw.w_in).split(lw.splits, dim=-1)
        gate, up = parts[0].chunk(2, dim=-1)
        dense = F.linear(F.gelu(gate, approximate="tanh") * up, lw.ffn_down)  # [N, D]
        probs = torch.softmax(parts[1], dim=-1, dtype=torch.float32)  # [N, E]
        top_w, top_i = torch.topk(probs, k=cfg.n_expert_used, dim=-1)  # [N, K]
        if lw.dense_experts:
            experts = dense_experts(parts[2], top_w, top_i, lw.expert_scale, lw.down_flat)  # [N, D]
        else:
            experts = grouped_experts(n, top_w, top_i, lw.expert_scale, lw.gate_up_exps, lw.down_exps)
        both = (self.norm(torch.stack([dense, experts])) * lw.post_ffw_norms).sum(0)  # [N, D]
        return (h + self.norm(both.view(B, L, D), lw.post_ffw_norm)) * lw.dec_scale

    @torch.inference_mode()
    def decode(self, canvas: torch.Tensor, cache: KVCache, sc_probs: torch.Tensor | None = None) -> torch.Tensor:
        """canvas: [B, C] ids; sc_probs: [B, C, V] or None. Returns softcapped float32 logits [B, C, V]."""
        x = self.embed[canvas]  # [B, C, D]
        if sc_probs is not None:  # the first step's signal, the bias-free MLP of zeros, is exactly zero
            soft = sc_probs @ self.embed  # [B, C, D]
            gate, up = F.linear(self.norm(soft), self.sc_gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.gelu(gate, approximate="tanh") * up, self.sc_down)
        x = self.norm(x)
        rope = self.rope(cache.length, canvas.shape[1])
        for i in range(self.cfg.n_layer):
            x = self.layer(i, x, rope[i], cache)
        logits = F.linear(self.norm(x), self.head)  # [B, C, V], divided by the softcap
        cap = self.cfg.softcap
        return torch.tanh(logits) * cap if cap else logits

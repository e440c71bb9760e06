"""Uniform-state block diffusion, as DiffusionGemma is trained, on transformers' own modules.

One training row is a window of clean tokens `x` (length T) and `n` canvases inside it: canvas b covers
positions [s_b, s_b + C) with s_b = offset + b*C (offset = the row's prompt length). Per row:

1. Encoder: one causal pass of `model.model.encoder.language_model` over the clean window fills a KV
   cache (sliding layers: causal with window W), exactly the cache inference builds canvas by canvas
   (a causal pass over a prefix does not depend on what follows it).
2. Corruption: per canvas, t ~ U(eps, 1 - eps); each of its C clean tokens is replaced, with
   probability t, by a token drawn uniformly from the whole vocabulary (no mask token).
3. Decoder: every canvas is its own decoder row (batch B*n) reading the cache of its row through a
   mask that shows it what inference would show it: on global layers the clean positions < s_b, on
   sliding layers the last W-1 of them (dgemma's engine and transformers' sliding cache keep W-1),
   plus the whole canvas, bidirectionally. Positions continue at s_b.
4. Self-conditioning: with probability p_sc per canvas, a first decoder pass without gradient and without
   self-conditioning gives logits; the graded pass gets `self_conditioning_logits` = those (softcapped)
   logits divided by the sampler temperature T(t) = t_min + (t_max - t_min) * t, i.e. what the sampler
   feeds back (processed logits), at the temperature the schedule uses at that noise level (the first
   step, all noise, runs at t_max). Canvases without it get `self_conditioning_mask` = False: a zero
   signal, as on the first denoising step.
5. Loss: cross-entropy against the clean canvas at all C positions (corrupted or not), mean over
   canvases, plus the encoder's next-token cross-entropy on the clean window (NeMo AutoModel's
   co-trained AR term, weight 1) and a small Switch-style load-balancing term on the MoE routers.
   Two parameterisations of the canvas term (the variants of NVIDIA Megatron-Bridge's DiffusionGemma
   SFT loss, a port of Google's hackable-diffusion objectives):
   - "base" (base-sft): CE of softmax(f), f = the model's logits;
   - "loo" (loo-ce, the default here): CE of softmax(f + delta(t) * onehot(x_t)) with
     delta(t) = log(1 + K(1-t)/t). Under uniform corruption the Bayes denoiser is the leave-one-out
     posterior (each token predicted from the others) times the likelihood of the observed token, whose
     log is exactly that shift; so f itself learns the leave-one-out posterior and never "copies" the
     observed token. That matters here because the sampler reads f: with "base" a small, briefly
     trained model copies most random tokens of the canvas (measured: 75% of corrupted positions
     copied after 626 steps, half of the generated words not words; docs/DEFAULT_MODEL.md).
   The evaluation reports the trained form and, as `raw`, the CE of f itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

T_MIN, T_MAX = 0.4, 0.8
NOISE_EPS = 1e-3


@dataclass(frozen=True)
class ModelSpec:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 512
    layer_types: tuple[str, ...] = ("sliding_attention", "sliding_attention", "full_attention",
                                    "sliding_attention", "sliding_attention", "full_attention")
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    num_global_key_value_heads: int = 1
    head_dim: int = 64
    global_head_dim: int = 128
    num_experts: int = 8
    top_k_experts: int = 2
    moe_intermediate_size: int = 256
    sliding_window: int = 128
    canvas_length: int = 32
    max_position_embeddings: int = 4096

    def text_config(self) -> dict:
        d = asdict(self)
        d.pop("canvas_length")
        d["layer_types"] = list(self.layer_types)
        d["num_hidden_layers"] = len(self.layer_types)
        return dict(d, enable_moe_block=True, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                    final_logit_softcapping=30.0, bos_token_id=2, eos_token_id=1, pad_token_id=0)


def make_model(spec: ModelSpec, seed: int, qk_norm_init: bool = False):
    """A fresh DiffusionGemmaForBlockDiffusion (float32, sdpa) with a deliberately tiny vision tower
    (the converter skips it; transformers builds a 167M-parameter default one otherwise).

    qk_norm_init: start the q/k RMSNorm weights at head_dim**-0.25 instead of 1. Gemma 4 attends with
    scale 1.0 on unit-RMS queries and keys, so at initialisation the attention logits have a standard
    deviation of sqrt(head_dim) (8 here) and every head is nearly one-hot on a random key; this start
    makes them ~1 (what 1/sqrt(d) scaling gives). Only the initial values change, not the architecture."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    from dgemma.convert.tiny import TINY_VISION

    config = DiffusionGemmaConfig(text_config=spec.text_config(), canvas_length=spec.canvas_length,
                                  vision_config=dict(model_type="gemma4_vision", **TINY_VISION))
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config)
    if qk_norm_init:
        with torch.no_grad():
            for name, module in model.named_modules():
                if "vision" not in name and name.endswith(("q_norm", "k_norm")):
                    module.weight.fill_(module.weight.shape[0] ** -0.25)
    model.requires_grad_(False)
    for p in text_parameters(model):
        p.requires_grad_(True)
    return model


def text_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters the text model uses (tied ones once); the vision tower is left out."""
    seen, out = set(), []
    for name, p in model.named_parameters():
        if "vision" in name or id(p) in seen:
            continue
        seen.add(id(p))
        out.append(p)
    return out


def text_parameter_count(model) -> int:
    return sum(p.numel() for p in text_parameters(model))


# ---- masks --------------------------------------------------------------------------------------
def encoder_masks(T: int, window: int) -> dict[str, torch.Tensor]:
    q = torch.arange(T)[:, None]
    k = torch.arange(T)[None, :]
    causal = k <= q
    return {"full_attention": causal[None, None], "sliding_attention": (causal & (q - k < window))[None, None]}


def decoder_masks(starts: torch.Tensor, T: int, C: int, window: int) -> dict[str, torch.Tensor]:
    """starts: [R] canvas start per decoder row. Keys: the T clean positions, then the C canvas ones."""
    k = torch.arange(T)[None, :]  # [1, T]
    s = starts[:, None]  # [R, 1]
    full = k < s  # [R, T]
    sliding = full & (k >= s - (window - 1))
    own = torch.ones(starts.shape[0], C, dtype=torch.bool)
    out = {}
    for name, cached in (("full_attention", full), ("sliding_attention", sliding)):
        row = torch.cat([cached, own], dim=1)  # [R, T+C]
        out[name] = row[:, None, None, :].expand(-1, 1, C, -1)
    return out


# ---- the pieces of one step ---------------------------------------------------------------------
def corrupt(x0: torch.Tensor, t: torch.Tensor, vocab_size: int, gen: torch.Generator) -> torch.Tensor:
    """x0: [R, C] clean canvases; t: [R]. Each token is replaced by a uniform draw with probability t."""
    flip = torch.rand(x0.shape, generator=gen) < t[:, None]
    noise = torch.randint(0, vocab_size, x0.shape, generator=gen)
    return torch.where(flip, noise, x0)


def sc_temperature(t: torch.Tensor) -> torch.Tensor:
    return T_MIN + (T_MAX - T_MIN) * t


class Router:
    """Collects the routers' probabilities and choices during a forward (for the balance loss)."""

    def __init__(self, model) -> None:
        from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextRouter

        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.active = False
        self.hooks = [m.register_forward_hook(self._hook) for m in model.modules()
                      if isinstance(m, DiffusionGemmaTextRouter)]

    def _hook(self, module, args, out) -> None:
        if self.active and torch.is_grad_enabled():
            probs, _, top_i = out
            self.records.append((probs, top_i))

    def balance_loss(self, n_experts: int) -> torch.Tensor:
        """Switch Transformer: E * sum_e (fraction routed to e) * (mean router probability of e), mean over layers."""
        losses = []
        for probs, top_i in self.records:
            frac = F.one_hot(top_i, n_experts).float().sum(1).mean(0) / top_i.shape[1]
            losses.append(n_experts * (frac * probs.mean(0)).sum())
        self.records = []
        return torch.stack(losses).mean() if losses else torch.zeros(())


@dataclass
class StepOut:
    loss: torch.Tensor  # what is minimised
    diffusion: torch.Tensor  # mean CE over canvases
    per_canvas: torch.Tensor  # [R] CE per canvas (detached)
    encoder_ar: torch.Tensor
    balance: torch.Tensor
    raw: torch.Tensor  # mean CE of the network's own logits (what the sampler reads)


def forward(model, x: torch.Tensor, offsets: torch.Tensor, n_blocks: int, gen: torch.Generator, *,
            t: torch.Tensor | None = None, sc_prob: float = 0.5, sc: torch.Tensor | None = None,
            encoder_ar_weight: float = 0.0, balance_weight: float = 0.0, router: Router | None = None,
            variant: str = "loo", merged: bool = True) -> StepOut:
    """x: [B, T] clean windows; offsets: [B] first canvas start per row (T >= offset + n_blocks*C).
    t / sc (optional, [B*n]): fixed noise levels / self-conditioning choices (evaluation).
    merged: run the decoder on one row per window (`_merged_decoder`, the fast form) instead of one row
    per canvas (`_canvas_decoder`, the plain one); the same function of the same draws."""
    from transformers import DynamicCache

    cfg = model.config.text_config
    C, W, V = model.config.canvas_length, cfg.sliding_window, cfg.vocab_size
    B, T = x.shape
    R = B * n_blocks
    starts = (offsets[:, None] + C * torch.arange(n_blocks)[None, :]).reshape(R)  # [R]
    rows = torch.arange(B).repeat_interleave(n_blocks)  # [R] the window each canvas comes from
    x0 = x[rows[:, None], starts[:, None] + torch.arange(C)[None, :]]  # [R, C]

    if router is not None:
        router.active = True
    enc = model.model.encoder.language_model
    cache = DynamicCache()
    enc_out = enc(input_ids=x, attention_mask=encoder_masks(T, W), position_ids=torch.arange(T)[None].expand(B, -1),
                  past_key_values=cache, use_cache=True)

    if t is None:
        t = torch.empty(R).uniform_(NOISE_EPS, 1 - NOISE_EPS, generator=gen)
    xt = corrupt(x0, t, V, gen)
    if sc is None:
        sc = torch.rand(R, generator=gen) < sc_prob
    decode = _merged_decoder(model, cache, starts, B, n_blocks, T, C, W) if merged else \
        _canvas_decoder(model, cache, starts, n_blocks, T, C, W)
    sc_logits = None
    if bool(sc.any()):
        sel = sc.nonzero().squeeze(1)
        with torch.no_grad():
            first = decode(xt, sel, None, None)  # [n_sc, C, V], softcapped like the model's output
        sc_logits = torch.zeros(R, C, V)
        sc_logits[sel] = first / sc_temperature(t[sel])[:, None, None]
    logits = decode(xt, None, sc_logits, sc if sc_logits is not None else None)
    raw_ce = F.cross_entropy(logits.reshape(-1, V), x0.reshape(-1), reduction="none").view(R, C).mean(1)
    if variant == "loo":
        logits = loo_to_denoiser(logits, xt, t, V)
        ce = F.cross_entropy(logits.reshape(-1, V), x0.reshape(-1), reduction="none").view(R, C).mean(1)
    else:
        ce = raw_ce
    diffusion = ce.mean()
    loss = diffusion
    encoder_ar = torch.zeros(())
    if encoder_ar_weight > 0:
        logits_ar = _softcapped_logits(model, enc_out.last_hidden_state[:, :-1])
        encoder_ar = F.cross_entropy(logits_ar.reshape(-1, V), x[:, 1:].reshape(-1))
        loss = loss + encoder_ar_weight * encoder_ar
    balance = torch.zeros(())
    if router is not None:
        router.active = False
        balance = router.balance_loss(cfg.num_experts)
        if balance_weight > 0:
            loss = loss + balance_weight * balance
    return StepOut(loss, diffusion, ce.detach(), encoder_ar.detach(), balance.detach(), raw_ce.mean().detach())


def _softcapped_logits(model, h: torch.Tensor) -> torch.Tensor:
    cap = model.final_logit_softcapping
    return torch.tanh(model.lm_head(h).float() / cap) * cap


def _canvas_decoder(model, cache, starts: torch.Tensor, n_blocks: int, T: int, C: int, W: int):
    """The plain form: every canvas its own decoder row, with its window's cache repeated n_blocks times.
    Returns decode(xt [R, C], rows or None, sc_logits, sc_mask) -> softcapped logits [rows, C, V]."""
    from transformers import DynamicCache

    dec_cache = DynamicCache()
    for i, layer in enumerate(cache.layers):
        dec_cache.update(layer.keys.repeat_interleave(n_blocks, 0), layer.values.repeat_interleave(n_blocks, 0), i)
    masks = decoder_masks(starts, T, C, W)
    positions = starts[:, None] + torch.arange(C)[None, :]  # [R, C]

    def decode(xt, rows_sel, sc_logits, sc_mask):
        sub = dec_cache if rows_sel is None else _select(dec_cache, rows_sel)
        pick = (lambda a: a) if rows_sel is None else (lambda a: a[rows_sel])
        h = model.model.decoder(decoder_input_ids=pick(xt), past_key_values=sub, self_conditioning_logits=sc_logits,
                                self_conditioning_mask=sc_mask,
                                decoder_attention_mask={k: pick(v) for k, v in masks.items()},
                                decoder_position_ids=pick(positions)).last_hidden_state
        return _softcapped_logits(model, h)

    return decode


def merged_decoder_masks(starts: torch.Tensor, T: int, C: int, window: int) -> dict[str, torch.Tensor]:
    """starts: [B, n] canvas starts. One decoder row per window holding its n canvases one after the other
    ([B, n*C] queries): canvas b sees the cache as `decoder_masks` shows it and its own keys, never the
    other canvases. Keys: the T clean positions, then the n*C canvas ones."""
    B, n = starts.shape
    per_canvas = decoder_masks(starts.reshape(-1), T, C, window)  # [B*n, 1, C, T+C]
    block = torch.arange(n).repeat_interleave(C)
    own = (block[:, None] == block[None, :])[None].expand(B, -1, -1)  # [B, n*C, n*C]
    return {name: torch.cat([m[:, 0, :, :T].reshape(B, n * C, T), own], dim=2)[:, None]
            for name, m in per_canvas.items()}  # [B, 1, n*C, T+n*C]


def _merged_decoder(model, cache, starts: torch.Tensor, B: int, n: int, T: int, C: int, W: int):
    """The fast form of `_canvas_decoder`: one decoder row per window, its n canvases side by side under a
    block mask, reading the window's cache once (no n-fold copy). Self-conditioning is chosen per canvas:
    transformers' mask is per row, so the signal of the canvases without it is zeroed by a forward
    pre-hook on the self-conditioning module (what a None signal gives: zeros)."""
    masks = merged_decoder_masks(starts.view(B, n), T, C, W)
    positions = starts.view(B, n).repeat_interleave(C, dim=1) + torch.arange(C).repeat(n)[None]  # [B, n*C]
    sc_module = model.model.decoder.self_conditioning

    def decode(xt, rows_sel, sc_logits, sc_mask):
        # rows_sel (canvases) -> the windows holding them; all their canvases are decoded, the rest dropped
        wins = torch.arange(B) if rows_sel is None else torch.unique(rows_sel // n)
        sub = cache if rows_sel is None else _select(cache, wins)
        ids = xt.view(B, n * C)[wins]
        sc_in, keep = None, None
        if sc_logits is not None:
            sc_in = sc_logits.view(B, n * C, -1)[wins]
            keep = sc_mask.view(B, n)[wins].repeat_interleave(C, dim=1)[..., None]  # [b, n*C, 1]
        hook = sc_module.register_forward_pre_hook(
            lambda mod, args: (args[0], args[1] * keep.to(args[1].dtype))) if keep is not None else None
        try:
            h = model.model.decoder(decoder_input_ids=ids, past_key_values=sub, self_conditioning_logits=sc_in,
                                    decoder_attention_mask={k: v[wins] for k, v in masks.items()},
                                    decoder_position_ids=positions[wins]).last_hidden_state
        finally:
            if hook is not None:
                hook.remove()
        logits = _softcapped_logits(model, h).view(len(wins) * n, C, -1)  # [b*n, C, V]
        if rows_sel is None:
            return logits
        local = (wins[:, None] * n + torch.arange(n)[None]).reshape(-1)  # canvases decoded, in order
        pos = torch.searchsorted(local, rows_sel)
        return logits[pos]

    return decode


def loo_delta(t: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log(1 + K(1-t)/t): how much more likely the observed token is to be the clean one than any other
    token is, under uniform corruption at level t (alpha = 1 - t kept, K the vocabulary)."""
    return torch.log1p(vocab_size * (1 - t) / t.clamp(min=1e-12))


def loo_to_denoiser(logits: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Leave-one-out logits [R, C, V] -> denoiser logits: add delta(t) to the observed token's logit."""
    shift = loo_delta(t, vocab_size)[:, None, None].expand(-1, xt.shape[1], 1).to(logits.dtype)
    return logits.scatter_add(-1, xt[..., None], shift)


def _select(cache, rows: torch.Tensor):
    from transformers import DynamicCache

    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys[rows], layer.values[rows], i)
    return out

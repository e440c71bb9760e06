"""The 26B-A4B at its real shapes with synthetic quantized weights: ms per denoising step, prefill ms, achieved
TFLOP/s and GB/s against the GPU's peak, peak VRAM and tokens/s, for the cuda backend and the torch backend
in the same run (issue 5, docs/CUDA.md step 6).

- cuda backend: weights as GGML blocks (bench/synthetic.py) for each plan (a preset, or a `--fit` VRAM
  budget); a denoising step is the fused sampler pass: decoder to the final norm, the fused head
  (argmax, entropy, sample, softmax @ E) and accept/re-noise, as Engine runs it with rng="counter".
  The KV cache is f16 (the cuda backend's default).
- torch backend: the same model code on float32 weights (cuBLAS), a step being the sampler's TorchSteps
  pass (decoder, logits, softmax, entropy, argmax, multinomial) and accept(), on the GPU (faster than the
  engine's torch backend, which samples on the CPU); skipped when its 4 bytes per parameter do not fit.
  Without it, the ratios are against the first cuda line; later variants of a plan (another matmul, no
  graphs) are also compared with its first.
Prefill is the encoder over 512 and 4096 prompt tokens, in passes of the engine's num_batch (512) as
Engine.generate runs it; the peak VRAM figure adds a second 4096-token prompt (8K context), where the step is
timed again (one warm-up and --steps timed: the attention's share grows with the context) and one step, counting what PyTorch's allocator holds (the CUDA context and NVRTC modules,
~0.5 GB, come on top). Tokens/s assumes 16 steps per 256-token canvas. Last, the last plan again with the
experts of as many layers in page-locked host RAM, copied to the GPU each pass, as a `--stream-for` GPU (8 GiB)
needs (plugin/cuda/offload.py): against the same plan whole, what streaming costs.

    python bench/model_gpu.py [--plans Q4_K_M,12GB] [--steps 5] [--config DIR] [--no-torch] [--stream-for 8GB]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from dataclasses import fields, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import CONFIG_26B, SyntheticTensors, gpu_capability, model_config, plan_rows, sync, timed  # noqa: E402

from dgemma.plugin.config import ModelConfig  # noqa: E402
from dgemma.plugin.engine import DEFAULT_NUM_BATCH  # noqa: E402
from dgemma.plugin.kv_cache import KVCache  # noqa: E402
from dgemma.plugin.model import DiffusionGemma, Weights  # noqa: E402

# dense bf16 tensor-core FLOP/s and HBM bytes/s from the datasheets (SXM parts), by device-name substring
PEAKS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12), "L40S": (362e12, 0.864e12),
         "RTX 4090": (165e12, 1.008e12), "RTX 3060": (51e12, 0.36e12)}
STEPS_PER_CANVAS = 16


def peaks() -> tuple[float, float] | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in PEAKS.items() if k in name), None)


def weight_bytes(w: Weights) -> int:
    """Bytes of every matrix: GGML blocks (quantized) or float tensors, the tied embedding once."""
    seen: set[int] = set()

    def size(obj) -> int:
        t = obj if isinstance(obj, torch.Tensor) else getattr(obj, "data", None)
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.data_ptr() in seen:
            return 0
        seen.add(t.data_ptr())
        return t.numel() * t.element_size()

    total = size(w.embed) + size(w.head) + sum(size(getattr(w, f)) for f in ("sc_gate", "sc_up", "sc_down"))
    return total + sum(size(getattr(lw, f.name)) for lw in w.layers for f in fields(lw))


def estimate_8k(cfg: ModelConfig, rows: list) -> float:
    """The converter's VRAM estimate for a plan's tensors at 8K context (quant/planner.py, what --fit holds
    against its budget), without the CUDA context: the part the measured peak (PyTorch's allocator) counts."""
    from dgemma.quant.planner import PLAN_CTX, nbytes, runtime_breakdown

    weights = sum(nbytes(shape, t) for _, shape, t in rows)
    return runtime_breakdown(weights, cfg.model_dims(), PLAN_CTX, cuda_context=0).total / 2**30


def float_weights(w: Weights, device: str) -> Weights:
    """The torch backend's weights for the same shapes: every quantized matrix as random float32, head tied."""
    def f(obj):
        return obj if isinstance(obj, torch.Tensor) or obj is None else torch.randn(*obj.shape, device=device) * 0.02

    layers = [replace(lw, **{x.name: f(getattr(lw, x.name)) for x in fields(lw) if x.name not in
                             ("wqkv", "qkv_norm", "ffn_gate_up", "down_exps_flat")}) for lw in w.layers]
    return replace(w, embed=f(w.embed), sc_gate=f(w.sc_gate), sc_up=f(w.sc_up), sc_down=f(w.sc_down), layers=layers,
                   head=None)


def fused_step(model: DiffusionGemma, cache: KVCache, canvas: torch.Tensor, seed: int = 1, graphs: bool = False):
    """A callable running one pass as Engine does with rng="counter" (engine._fused_steps: the decoder pass,
    replayed from a CUDA graph when `graphs` (plugin/cuda/graph.py), the fused head, then accept/re-noise),
    each call the next pass. With graphs the first three calls run eagerly, warm up, then capture."""
    from dgemma.plugin.engine import _fused_steps

    decode = None
    if graphs:
        from dgemma.plugin.cuda.graph import GraphedDecoder

        decode = GraphedDecoder(model, cache)
    steps = _fused_steps(model, cache, model.cfg.vocab_size, seed, canvas.device, decode)
    state = {"canvas": canvas, "sc": None}
    t = torch.tensor(0.6)

    def step() -> None:
        out = steps.denoise(state["canvas"], state["sc"], t)
        state["canvas"], _ = steps.accept_renoise(state["canvas"], out, 0.1)
        state["sc"] = out.sc

    if graphs:
        for _ in range(3):
            step()
        sync(canvas.device)
        step.graphed = decode
    return step


def logits_step(model: DiffusionGemma, cache: KVCache, canvas: torch.Tensor):
    """One torch-backend pass on the device: the sampler's TorchSteps.denoise (logits / T, softmax, entropy,
    argmax, multinomial) on the model's logits, then accept(); the generator is the device's."""
    from dgemma.plugin.sampler import TorchSteps, accept

    gen = torch.Generator(device=canvas.device).manual_seed(1)
    steps = TorchSteps(lambda c, sc: model.decode(c, cache, sc), model.cfg.vocab_size, gen)
    state = {"sc": None}
    t = torch.tensor(0.6)

    def step() -> None:
        out = steps.denoise(canvas, state["sc"], t)
        accept(canvas, out.sample, out.entropy, 0.1)
        state["sc"] = out.sc

    return step


def logprobs_ms(model: DiffusionGemma, cache: KVCache, canvas: torch.Tensor, device: torch.device) -> float:
    """ms to form a whole canvas's logprobs with 5 alternatives each (plugin/logprobs.py, as the engine does once a
    canvas is done: the head's logits LOGPROB_ROWS positions at a time, from the last pass's output)."""
    from dgemma.plugin.logprobs import token_logprobs

    hidden = model.decode_hidden(canvas, cache)  # [1, C, D]
    tokens = canvas[0].tolist()
    return timed(lambda: token_logprobs(model.head_rows(hidden), tokens, 5), device)


def measure(name: str, cfg: ModelConfig, w: Weights, device: torch.device, steps: int, fused: bool,
            prompts: tuple[int, ...] = (512, 4096), graphs: bool = False, peak: bool = True,
            label: str | None = None) -> dict:
    """Prefill, per-step time, rates and peak memory (peak: at 8K context) of one backend's weights; graphs:
    the fused pass's decoder replayed from a CUDA graph. label: what other lines call it in their ratios."""
    model = DiffusionGemma(cfg, w)
    kv = torch.float16 if fused else None  # each backend's default KV cache (Engine.load's kv_cache)

    def new_cache() -> KVCache:  # as Engine.generate makes it: room for the canvas after the cached positions
        return KVCache(dtype=kv, reserve=cfg.canvas_length)

    g = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (1, max(prompts)), device=device, generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), device=device, generator=g)
    wbytes = weight_bytes(w)
    out = {"name": name, "label": label or name, "weights_GB": wbytes / 1e9}
    for j, n in enumerate(prompts):  # one warm-up, before the first size only (a long prefill is slow)
        out[f"prefill_{n}_ms"] = timed(lambda: model.encode(tokens[:, :n], new_cache(), chunk=DEFAULT_NUM_BATCH),
                                       device, warmup=j == 0)
    cache = new_cache()
    model.encode(tokens[:, : prompts[0]], cache)
    step = fused_step(model, cache, canvas, graphs=graphs) if fused else logits_step(model, cache, canvas)
    out["step_ms"] = timed(step, device, steps)
    if fused and peak:
        out["logprobs_ms"] = logprobs_ms(model, cache, canvas, device)
    graphed = getattr(step, "graphed", None)
    if graphed is not None:
        out["graph"] = f"{graphed.replays} replays" if graphed.fallback is None else f"eager: {graphed.fallback}"
        graphed.release()  # the 512-token cache's graph: not part of the 8K peak
    step = graphed = cache = None
    flop = cfg.decode_flops_per_token * cfg.canvas_length
    out["TFLOP/s"] = flop / out["step_ms"] / 1e9
    out["GB/s"] = wbytes / out["step_ms"] / 1e6  # every expert is touched at canvas 256
    out["tokens/s"] = cfg.canvas_length / (STEPS_PER_CANVAS * out["step_ms"] / 1e3)
    if not peak:
        return out
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cache = new_cache()
    for _ in range(2):  # 2 x 4096: 8K context
        model.encode(tokens[:, : prompts[-1]], cache, chunk=DEFAULT_NUM_BATCH)
    step = fused_step(model, cache, canvas, graphs=graphs) if fused else logits_step(model, cache, canvas)
    out["step_8k_ms"] = timed(step, device, steps)  # the canvas attending over 8K positions
    if device.type == "cuda":
        out["peak_8k_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def report(r: dict, bases: list[dict]) -> str:
    """r's line, each figure with its ratio against the same figure of every base measured before it."""
    pk = peaks()
    rates = f"{r['TFLOP/s']:.1f} TFLOP/s, {r['GB/s']:.0f} GB/s"
    if pk:
        rates += f" ({r['TFLOP/s'] * 1e12 / pk[0]:.1%} of peak compute, {r['GB/s'] * 1e9 / pk[1]:.1%} of peak bandwidth)"
    def vs(key: str, faster: bool = True) -> str:
        parts = [f"{(b[key] / r[key] if faster else r[key] / b[key]):.2f}x {'faster than' if faster else 'of'} "
                 f"{b['label']}" for b in bases if b is not r and key in b]
        return f" ({'; '.join(parts)})" if parts else ""

    line = (f"{r['name']:<26} weights {r['weights_GB']:.2f} GB | step {r['step_ms']:.1f} ms{vs('step_ms')}, {rates} | "
            f"{r['tokens/s']:.0f} tokens/s at {STEPS_PER_CANVAS} steps | prefill "
            + ", ".join(f"{k.split('_')[1]}: {v:.0f} ms{vs(k)}" for k, v in r.items() if k.startswith("prefill_")))
    if "graph" in r:
        line += f" | CUDA graph: {r['graph']}"
    if "logprobs_ms" in r:
        line += (f" | a canvas's logprobs {r['logprobs_ms']:.1f} ms (x{r['logprobs_ms'] / (STEPS_PER_CANVAS * r['step_ms']):.2f}"
                 f" of its {STEPS_PER_CANVAS} steps)")
    if "step_8k_ms" in r:
        line += f" | step at 8K context {r['step_8k_ms']:.1f} ms{vs('step_8k_ms')}"
    if "peak_8k_GiB" in r:
        line += f" | peak VRAM at 8K: {r['peak_8k_GiB']:.2f} GiB{vs('peak_8k_GiB', faster=False)}"
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plans", default="Q4_K_M,12GB", help="presets or --fit budgets, comma-separated")
    ap.add_argument("--steps", type=int, default=5, help="timed denoising steps per plan")
    ap.add_argument("--config", default=str(CONFIG_26B), help="a checkpoint folder or config.json folder")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch backend (float32 weights)")
    ap.add_argument("--matmuls", default="auto", help="matmul kernels to measure, comma-separated: auto (the "
                    "engine's default: the fastest per weight shape, plugin/cuda/tune.py), scalar, f16, f16-wide, int8, "
                    "int8-wide, f16-cublas; the "
                    "first for every plan, the others (step time only) for the first plan")
    ap.add_argument("--eager", action="store_true", help="also measure the first plan's step without CUDA graphs")
    ap.add_argument("--stream-for", default="8GB", metavar="SIZE",
                    help="last, the last plan again with the experts of as many layers in host RAM as a GPU of SIZE "
                         "would need at 8K context (plugin/cuda/offload.py; default 8GB, '' to skip)")
    args = ap.parse_args()
    from dgemma.plugin.cuda.tune import choose
    from dgemma.plugin.cuda.weights import cuda_weights
    from dgemma.quant.planner import CUDA_CONTEXT

    cap = gpu_capability("bench/model_gpu.py")
    dev = torch.device("cuda")
    cfg = model_config(args.config)
    print(f"{torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]}), torch {torch.__version__}; {cfg.n_layer} layers, "
          f"hidden {cfg.n_embd}, {cfg.n_expert} experts top-{cfg.n_expert_used}, vocab {cfg.vocab_size}, canvas "
          f"{cfg.canvas_length}; {cfg.decode_flops_per_token * cfg.canvas_length / 1e12:.2f} TFLOP per step", flush=True)
    base = None
    results = []
    tune_cache = Path(tempfile.mkdtemp()) / "matmul.json"
    for i, plan in enumerate(args.plans.split(",")):
        rows = plan_rows(args.config, plan)
        make = lambda: cuda_weights(SyntheticTensors(rows), cfg, device="cuda")  # noqa: E731
        print(f"plan {plan}: the planner's VRAM estimate at 8K context {estimate_8k(cfg, rows):.2f} GiB, without the "
              f"CUDA context (--fit adds {CUDA_CONTEXT / 2**30:.2f} GiB for it): against the peak VRAM at 8K below",
              flush=True)
        w = make()
        if i == 0 and not args.no_torch:  # the baseline first: a kernel that brings the GPU down cannot lose it
            params = sum(math.prod(m.shape) for m in _matrices(w))
            free, _ = torch.cuda.mem_get_info()
            if 4 * params + (8 << 30) < free + weight_bytes(w):  # float32 weights + 8 GiB for activations
                fw = float_weights(w, "cuda")
                w = None
                torch.cuda.empty_cache()
                base = measure("torch float32 (cuBLAS; sampler on the GPU)", cfg, fw, dev, max(1, args.steps // 2),
                               fused=False, label="torch")
                print(report(base, []), flush=True)
                fw = None
                torch.cuda.empty_cache()
                w = make()  # again (seconds on the GPU): beside the float32 copy it would not fit on an 80 GB card
            else:
                print(f"torch backend skipped: {4 * params / 1e9:.0f} GB of float32 weights do not fit", flush=True)
        plan_first = len(results)  # this plan's first line (the streamed one is compared with the last plan's)
        variants = [(m, True) for m in args.matmuls.split(",")] + ([(args.matmuls.split(",")[0], False)] if args.eager else [])
        for j, (matmul, graphs) in enumerate(variants if i == 0 else variants[:1]):
            # a run's own tuning cache: a later variant with the same matmul reads the choice, not times it again
            kernels = choose(w, matmul, rows=cfg.canvas_length, cache=tune_cache, top_k=cfg.n_expert_used)
            print(f"matmul {matmul}: " + ", ".join(f"{c}: {k}" for c, k in sorted(kernels.items())), flush=True)
            name = f"cuda {plan} {matmul}{'' if graphs else ' eager'}"
            full = j == 0  # prefill and peak VRAM once per plan
            # against the torch backend, else the first cuda line; later variants also against the plan's first
            first = base or (results[0] if results else None)
            bases = [first] + ([results[-j]] if j and results[-j] is not first else [])  # each baseline once
            results.append(measure(name, cfg, w, dev, args.steps, fused=True, graphs=graphs,
                                   prompts=(512, 4096) if full else (512,), peak=full, label=name))
            print(report(results[-1], [b for b in bases if b is not None]), flush=True)
        w = None
        torch.cuda.empty_cache()
    if args.stream_for:
        # against the torch backend (or the first cuda line) and the same plan with every expert in VRAM
        streamed(args.stream_for, args, cfg, rows, plan, dev, tune_cache, [b for b in (base, results[plan_first]) if b])


def streamed(budget: str, args: argparse.Namespace, cfg: ModelConfig, rows: list, plan: str, dev: torch.device,
             tune_cache: Path, bases: list[dict], prompts: tuple[int, ...] = (512, 4096)) -> dict | None:
    """The plan with the experts of the fewest layers in page-locked host RAM that bring the --fit estimate at 8K
    (with the CUDA context) within `budget`, copied to the GPU as each pass reaches them: what a card of that
    size runs. Its step and prefill against `bases` (the same plan whole among them: what streaming costs), and
    its peak VRAM at 8K, to read against the budget."""
    from dgemma.plugin.cuda.tune import choose
    from dgemma.plugin.cuda.weights import cuda_weights
    from dgemma.quant.planner import PLAN_CTX, expert_sizes, nbytes, parse_size, runtime_breakdown, stream_for

    sizes = {n: nbytes(shape, t) for n, shape, t in rows}
    need = runtime_breakdown(sum(sizes.values()), cfg.model_dims(), PLAN_CTX).total
    layers, host, vram = stream_for(expert_sizes(sizes, cfg.n_layer), need, parse_size(budget))
    if not layers:
        print(f"plan {plan} at 8K: {need / 2**30:.2f} GiB, which streaming " +
              ("does not bring within " if layers is None else "is not needed for ") + budget, flush=True)
        return None
    print(f"plan {plan} on a {budget} GPU: experts of {len(layers)} of {cfg.n_layer} layers in host RAM "
          f"({host / 2**30:.2f} GiB page-locked, copied each pass); the estimate at 8K "
          f"{vram / 2**30:.2f} GiB with the CUDA context", flush=True)
    w = cuda_weights(SyntheticTensors(rows), cfg, device=str(dev), host_layers=layers)
    matmul = args.matmuls.split(",")[0]
    choose(w, matmul, rows=cfg.canvas_length, device=dev, cache=tune_cache, top_k=cfg.n_expert_used)
    name = f"cuda {plan} {matmul} streaming {len(layers)}"
    r = measure(name, cfg, w, dev, args.steps, fused=True, graphs=False, label=name, prompts=prompts)
    print(report(r, bases) + f" | PCIe: {host / r['step_ms'] / 1e6:.1f} GB/s of experts per step", flush=True)
    return r


def _matrices(w: Weights):
    for obj in [w.head, w.sc_gate, w.sc_up, w.sc_down] + [getattr(lw, f.name) for lw in w.layers for f in fields(lw)]:
        if obj is not None and not isinstance(obj, torch.Tensor):
            yield obj


if __name__ == "__main__":
    main()

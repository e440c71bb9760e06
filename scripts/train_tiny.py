#!/usr/bin/env python
"""Train the bundled default model: a small DiffusionGemma on Debian's fortune cookies, on CPU.

    python scripts/train_tiny.py                 # prepare, train (45 min budget on 2 cores), export
    python scripts/train_tiny.py --resume        # continue an interrupted run from its last checkpoint
    python scripts/train_tiny.py --export-only   # write plugin/models/ again from the last checkpoint

Stages (work files in --work, default /work/train_run; nothing is downloaded from the web):
1. data: the `fortunes` and `fortunes-min` Debian packages (installed with apt-get if missing),
   cleaned and split 98/2 (train/data.py);
2. tokenizer: 4096 BPE pieces learned on the training split, in Gemma 4's layout (train/tokenizer.py);
3. training: uniform-state block diffusion with self-conditioning (train/objective.py, train/loop.py);
4. export: `save_pretrained` + generation_config.json + tokenizer files -> `dgemma convert --type Q8_0`
   -> plugin/models/default.gguf, with plugin/models/default-train.json (settings, loss curve) and
   plugin/models/default-words.txt.gz (the training text's words, for tests/test_default_model.py).
docs/DEFAULT_MODEL.md describes the run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# On a shared machine OpenMP's spinning threads stall each other: measured 12-52 s/step with two
# spinning threads against 1.3 s passive (docs/DEFAULT_MODEL.md). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from train import data, objective, tokenizer  # noqa: E402
from train.episodes import Episodes  # noqa: E402
from train.loop import HeldOut, TrainConfig, train  # noqa: E402

MODELS = REPO / "plugin" / "models"
SPEC = objective.ModelSpec(
    vocab_size=4096, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
    num_global_key_value_heads=1, head_dim=64, global_head_dim=128, num_experts=8, top_k_experts=2,
    moe_intermediate_size=256, sliding_window=128,  # canvas_length: TrainConfig.canvas (--canvas)
    layer_types=("sliding_attention", "sliding_attention", "sliding_attention", "full_attention"),
)
SAMPLER = dict(max_denoising_steps=4, t_min=0.4, t_max=0.8, stability_threshold=1, confidence_threshold=0.005,
               entropy_bound=0.1)
EVAL_SEED = 4242


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare(work: Path, max_chars: int = 0, max_fortunes: int = 0) -> tuple[list[data.Fortune], list[data.Fortune], Path]:
    data.ensure_installed()
    fortunes = data.read_fortunes()
    if max_chars:  # the short fortunes only (docs/DEFAULT_MODEL.md: why)
        fortunes = [f for f in fortunes if len(f.text) <= max_chars]
    train_f, held_f = data.split(fortunes)
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        tokenizer.write_tokenizer(tok_dir, [f.text for f in train_f])
    train_f = data.subset(train_f, max_fortunes)  # fewer, seen more often (docs/DEFAULT_MODEL.md: why)
    log(f"data: {len(fortunes)} fortunes from {len(data.fortune_files())} files (tokenizer learned on them, in "
        f"{tok_dir}); training on {len(train_f)}, {len(held_f)} held out, {sum(len(f.text) for f in train_f)} characters")
    return train_f, held_f, tok_dir


def generation_config(spec: objective.ModelSpec) -> dict:
    s = SAMPLER
    return {"max_new_tokens": spec.canvas_length, "max_denoising_steps": s["max_denoising_steps"], "t_min": s["t_min"],
            "t_max": s["t_max"], "stability_threshold": s["stability_threshold"],
            "confidence_threshold": s["confidence_threshold"],
            "sampler_config": {"entropy_bound": s["entropy_bound"], "_cls_name": "EntropyBoundSamplerConfig"},
            "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}


def export(model, spec: objective.ModelSpec, tok_dir: Path, work: Path, summary: dict, train_texts: list[str]) -> Path:
    ckpt = work / "hf"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    model.save_pretrained(ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps(generation_config(spec), indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tok_dir / name, ckpt / name)
    MODELS.mkdir(parents=True, exist_ok=True)
    out = MODELS / "default.gguf"
    subprocess.run([sys.executable, "-m", "dgemma.plugin.cli", "convert", str(ckpt), "-o", str(out), "--type", "Q8_0",
                    "--force", "--quiet"], check=True, cwd=REPO)
    words = sorted(data.vocabulary(train_texts))
    with gzip.GzipFile(MODELS / "default-words.txt.gz", "wb", mtime=0) as f:
        f.write(("\n".join(words) + "\n").encode())
    summary["gguf_bytes"] = out.stat().st_size
    (MODELS / "default-train.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB), {len(words)} words, {MODELS / 'default-train.json'}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/work/train_run"))
    ap.add_argument("--resume", action="store_true", help="continue from WORK/checkpoint.pt")
    ap.add_argument("--export-only", action="store_true", help="export WORK/checkpoint.pt without training")
    ap.add_argument("--no-export", action="store_true")
    for f in fields(TrainConfig):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = ap.parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    torch.set_num_threads(cfg.threads)
    spec = replace(SPEC, canvas_length=cfg.canvas)
    t0 = time.time()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    train_f, held_f, tok_dir = prepare(work, cfg.max_chars, cfg.max_fortunes)
    tok = tokenizer.load(tok_dir)
    answers = set(data.subset(train_f, cfg.generic_answers))  # all of them when generic_answers is 0
    train_eps = Episodes([f.text for f in train_f], tok, canvas=spec.canvas_length, blocks=cfg.blocks, p_chat=cfg.p_chat,
                         p_generic=cfg.p_generic, answers=[i for i, f in enumerate(train_f) if f in answers])
    # held-out rows: the held-out fortunes only (no requests answered from the training set)
    held_eps = Episodes([f.text for f in held_f], tok, canvas=spec.canvas_length, blocks=cfg.blocks, p_chat=cfg.p_chat)
    held = HeldOut(held_eps, cfg.eval_rows, EVAL_SEED, cfg.variant)
    model = objective.make_model(spec, cfg.seed, qk_norm_init=bool(cfg.qk_norm_init))
    model.config.text_config._experts_implementation = "eager"
    n_params = objective.text_parameter_count(model)
    log(f"model: {n_params / 1e6:.2f} M text parameters, {len(spec.layer_types)} layers, vocab {spec.vocab_size}, canvas {spec.canvas_length}")

    run_file = work / "run.json"  # how the checkpoint was made, for --export-only
    if args.export_only:
        state = torch.load(work / "checkpoint.pt", weights_only=False)
        model.load_state_dict(state["model"])
        history = state["history"]
        run = json.loads(run_file.read_text()) if run_file.exists() else {}
    else:
        history = train(model, train_eps, held, cfg, work, args.resume, log=log)
        run = {"command": "python scripts/train_tiny.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "total_wall_min": round((time.time() - t0) / 60, 1)}
        run_file.write_text(json.dumps(run) + "\n")
    if args.no_export:
        return 0
    final_sc = held.loss(model, self_conditioning=True)
    evals = history["eval"]
    summary = {
        "command": run.get("command", "python scripts/train_tiny.py").strip(),
        "data": {"packages": list(data.PACKAGES), "fortunes": len(train_f) + len(held_f), "train": len(train_f),
                 "heldout": len(held_f), "train_tokens": sum(len(i) for i in train_eps.ids)},
        "model": {**asdict(spec), "text_parameters": n_params},
        "train": {**asdict(cfg), "steps": history.get("steps"), "wall_min": round(history.get("wall_s", 0) / 60, 1)},
        "sampler": SAMPLER,
        "heldout_loss": {
            "what": "mean cross-entropy (nats/token) against the clean canvas on fixed held-out rows, "
                    "no self-conditioning, averaged over t = 0.1, 0.3, 0.5, 0.7, 0.9",
            "random_init": evals[0]["loss"], "final": evals[-1]["loss"], "final_with_self_conditioning": final_sc["loss"],
            "final_per_t": evals[-1]["per_t"],
            "curve": [[e["step"], round(e["loss"], 4)] for e in evals],
        },
        "train_loss_curve": [[h["step"], round(h["diffusion_ema"], 4)] for h in history["train"]][::5],
        "total_wall_min": run.get("total_wall_min"),  # data + tokenizer + training, before the export
    }
    export(model, spec, tok_dir, work, summary, [f.text for f in train_f])
    return 0


if __name__ == "__main__":
    sys.exit(main())

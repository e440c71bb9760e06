"""The training loop: AdamW, warmup + cosine, held-out evaluation, resumable checkpoints.

Everything random is drawn from two seeded generators (a `random.Random` for the rows, a
`torch.Generator` for noise and self-conditioning) whose states are saved with the model and the
optimizer, so a run resumed with `--resume` continues the same sequence of batches.

The number of steps is fixed at the start of a run, either by `--steps` or, with `--steps 0`, sized
from the measured speed of the first steps to fit `--budget-min` (the machine may be shared, so the
speed is measured, not assumed); it is saved in the checkpoint and in the log, and `--steps N`
reproduces the schedule exactly. `--budget-min` also stops the run (with a checkpoint) if the machine
gets slower than measured.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import objective as O
from .episodes import Episodes

EVAL_T = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass
class TrainConfig:
    seed: int = 1
    batch: int = 12  # rows per step
    canvas: int = 1  # tokens per canvas (the model's canvas_length; docs/DEFAULT_MODEL.md: why one)
    blocks: int = 128  # canvases per row
    steps: int = 0  # 0: sized from the measured speed to fit budget_min
    budget_min: float = 45.0  # wall-clock minutes for the training loop (evaluations included)
    measure_steps: int = 12  # steps timed before sizing the run
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup: int = 40
    weight_decay: float = 0.05
    clip: float = 1.0
    sc_prob: float = 0.5
    encoder_ar_weight: float = 1.0
    balance_weight: float = 0.01
    p_chat: float = 0.5
    p_generic: float = 0.3  # chat rows that ask for a fortune in general and get a whole one (train/episodes.py)
    generic_answers: int = 0  # ... one of this many training fortunes (data.subset; 0: any)
    max_chars: int = 80  # train on fortunes of at most this many characters (0: all)
    max_fortunes: int = 0  # train on this many of them (0: all; data.subset)
    variant: str = "loo"  # "loo": leave-one-out parameterisation (train/objective.py); "base": plain CE
    qk_norm_init: int = 1  # 1: q/k norm weights start at head_dim**-0.25 (objective.make_model)
    eval_every: int = 100
    eval_rows: int = 24
    ckpt_minutes: float = 3.0
    threads: int = 2


def lr_at(step: int, total: int, c: TrainConfig) -> float:
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    p = min(1.0, (step - c.warmup) / max(1, total - c.warmup))
    return c.lr * (c.min_lr_frac + (1 - c.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def make_optimizer(model, c: TrainConfig) -> torch.optim.AdamW:
    params = O.text_parameters(model)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=c.lr, betas=(0.9, 0.95), eps=1e-8)


class HeldOut:
    """Fixed evaluation rows from the held-out fortunes, scored at fixed noise levels with fixed noise."""

    def __init__(self, episodes: Episodes, rows: int, seed: int, variant: str = "loo") -> None:
        self.x, self.offsets = episodes.batch(random.Random(seed), rows)
        self.n, self.seed, self.variant = episodes.n, seed, variant

    @torch.no_grad()
    def loss(self, model, self_conditioning: bool = False) -> dict:
        was = model.training
        model.eval()
        R = self.x.shape[0] * self.n
        per_t, raw = {}, {}
        for i, t in enumerate(EVAL_T):
            g = torch.Generator().manual_seed(self.seed * 1000 + i)
            out = O.forward(model, self.x, self.offsets, self.n, g, t=torch.full((R,), t),
                            sc=torch.full((R,), self_conditioning), variant=self.variant)
            per_t[t], raw[t] = out.diffusion.item(), out.raw.item()
        model.train(was)
        return {"loss": sum(per_t.values()) / len(per_t), "per_t": per_t,
                "raw": sum(raw.values()) / len(raw), "raw_per_t": raw}


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(model, train_eps: Episodes, held: HeldOut, c: TrainConfig, work: Path, resume: bool, log=print) -> dict:
    torch.set_num_threads(c.threads)
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = work / "checkpoint.pt", work / "log.jsonl"
    opt = make_optimizer(model, c)
    router = O.Router(model)
    rng = random.Random(c.seed)
    gen = torch.Generator().manual_seed(c.seed)
    step, total, elapsed_before, history = 0, c.steps, 0.0, {"eval": [], "train": []}
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        if state["config"] != asdict(c) | {"steps": state["config"]["steps"]}:
            log("note: resuming with different settings than the checkpoint's; using the checkpoint's schedule")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        rng.setstate(state["rng"])
        gen.set_state(state["gen"])
        step, total, elapsed_before, history = state["step"], state["total"], state["elapsed"], state["history"]
        log(f"resumed at step {step}/{total or '?'} ({elapsed_before / 60:.1f} min done)")
    else:
        log_path.write_text("")
        ev = held.loss(model)
        history["eval"].append({"step": 0, **ev})
        _append(log_path, {"step": 0, "eval": ev})
        log(f"step 0: held-out loss {ev['loss']:.4f} (random weights)")

    model.train()
    t_start = time.time() - elapsed_before
    last_ckpt = time.time()
    ema = None
    timed: list[float] = []

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng.getstate(),
                                    "gen": gen.get_state(), "step": step, "total": total,
                                    "elapsed": time.time() - t_start, "history": history, "config": asdict(c)})

    while total == 0 or step < total:
        t0 = time.time()
        lr = lr_at(step, total or 10**9, c) if total else c.lr * min(1.0, (step + 1) / c.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        x, offsets = train_eps.batch(rng, c.batch)
        out = O.forward(model, x, offsets, c.blocks, gen, sc_prob=c.sc_prob, encoder_ar_weight=c.encoder_ar_weight,
                        balance_weight=c.balance_weight, router=router, variant=c.variant)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(O.text_parameters(model), c.clip).item()
        opt.step()
        step += 1
        dt = time.time() - t0
        d = out.diffusion.item()
        ema = d if ema is None else 0.95 * ema + 0.05 * d
        rec = {"step": step, "lr": lr, "diffusion": d, "encoder_ar": out.encoder_ar.item(), "balance": out.balance.item(),
               "gnorm": gnorm, "sec": round(dt, 3), "elapsed": round(time.time() - t_start, 1)}
        _append(log_path, rec)
        if step % 10 == 0:
            history["train"].append({"step": step, "diffusion_ema": ema, "encoder_ar": rec["encoder_ar"]})
            log(f"step {step}/{total or '?'} loss {d:.3f} (ema {ema:.3f}) ar {rec['encoder_ar']:.3f} "
                f"lr {lr:.2e} {dt:.2f}s/step {rec['elapsed'] / 60:.1f} min")
        if total == 0:
            timed.append(dt)
            if len(timed) >= c.measure_steps:
                per_step = sorted(timed)[len(timed) // 2] * 1.12  # median, plus evaluations and checkpoints
                left = c.budget_min * 60 - (time.time() - t_start)
                total = step + max(1, int(left / per_step))
                log(f"measured {per_step:.2f}s/step (median of {len(timed)}, +12%): {total} steps fit "
                    f"{c.budget_min:.0f} min")
                _append(log_path, {"step": step, "sized_steps": total, "sec_per_step": per_step})
        if step % c.eval_every == 0 or step == total:
            ev = held.loss(model)
            history["eval"].append({"step": step, **ev})
            _append(log_path, {"step": step, "eval": ev})
            log(f"step {step}: held-out loss {ev['loss']:.4f}")
        if time.time() - last_ckpt > c.ckpt_minutes * 60:
            checkpoint()
            last_ckpt = time.time()
        if time.time() - t_start > c.budget_min * 60 * 1.08 and step < total:
            log(f"stopping at step {step}: over the time budget")
            ev = held.loss(model)
            history["eval"].append({"step": step, **ev})
            break
    history["steps"] = step
    history["total"] = total
    history["wall_s"] = time.time() - t_start
    checkpoint()
    return history


def _append(path: Path, rec: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(rec) + "\n")

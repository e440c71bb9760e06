"""Shared fixtures: tiny random DiffusionGemma checkpoints built with transformers, cached per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from dgemma.convert.tiny import TinySpec, build_checkpoint

# the most tokens at the end of a chat prompt that the next turn's prompt renders otherwise: Gemma 4's template
# ends the generation prompt with an empty thought channel and renders the reply without it
THOUGHT_CHANNEL_TOKENS = 8

# Three shapes of model, differing in every dimension the converter reads.
SPECS = {
    "base": TinySpec(),
    "bf16_wide": TinySpec(
        vocab_size=640, hidden_size=96, intermediate_size=128, num_hidden_layers=6,
        layer_types=("sliding_attention",) * 5 + ("full_attention",), num_attention_heads=2,
        num_key_value_heads=1, num_global_key_value_heads=1, head_dim=32, global_head_dim=64,
        num_experts=8, top_k_experts=3, moe_intermediate_size=96, sliding_window=16, canvas_length=32,
        dtype="bfloat16", seed=1,
    ),
    # rows that are not multiples of 32 (expert width 48) and a global layer in the middle
    "odd": TinySpec(
        num_hidden_layers=4, layer_types=("sliding_attention", "full_attention", "sliding_attention", "full_attention"),
        moe_intermediate_size=48, intermediate_size=80, num_experts=3, top_k_experts=1, seed=2,
        sampler=dict(max_denoising_steps=24, t_min=0.3, t_max=0.9, stability_threshold=2,
                     confidence_threshold=0.01, entropy_bound=0.2),
    ),
}

# the engine tests' third shape: 8 experts top-3 at widths past the dense-MoE threshold, canvas 32
WIDE_SPEC = TinySpec(
    vocab_size=640, hidden_size=96, intermediate_size=128, num_hidden_layers=4,
    layer_types=("sliding_attention", "sliding_attention", "sliding_attention", "full_attention"),
    num_attention_heads=4, num_key_value_heads=2, num_global_key_value_heads=1, head_dim=32, global_head_dim=64,
    num_experts=8, top_k_experts=3, moe_intermediate_size=64, sliding_window=12, canvas_length=32, seed=3,
)


def spy_encoder_passes(engine, setattr=setattr) -> list[int]:
    """The token count of every encoder pass the engine's model runs from now on (its first layer's input), the
    spy put in place by `setattr` (monkeypatch.setattr, or the builtin: `del engine.model.layer` takes it out)."""
    passes: list[int] = []
    layer = engine.model.layer

    def spy(i, x, *a, encoder, **kw):
        if i == 0 and encoder:
            passes.append(x.shape[1])
        return layer(i, x, *a, encoder=encoder, **kw)

    setattr(engine.model, "layer", spy)
    return passes


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("checkpoints")

    def make(spec: TinySpec) -> Path:
        key = spec.key()
        if key not in cache:
            cache[key] = build_checkpoint(spec, root / key)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def base_checkpoint(checkpoint_factory) -> Path:
    return checkpoint_factory(SPECS["base"])


@pytest.fixture(params=sorted(SPECS))
def any_checkpoint(request, checkpoint_factory) -> tuple[str, TinySpec, Path]:
    spec = SPECS[request.param]
    return request.param, spec, checkpoint_factory(spec)


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---- the cuda backend's tests (tests/cuda_util.py has their helpers) ----------------------------------
CANVAS16 = Path(__file__).resolve().parents[1] / ".gpu_wheels" / "canvas16-q8.gguf"  # scripts/gpu_prepare.sh


@pytest.fixture()
def kernels_as_references(monkeypatch):
    from cuda_util import use_references

    use_references(monkeypatch)


@pytest.fixture(params=["references", "emulated"])
def kernels(request, monkeypatch):
    """The csrc kernels as the cuda backend's CPU tests run them: replaced by their torch references, or
    themselves, compiled for the CPU emulator (tests/cuda_emu.py), where the test must have launched some.
    Yields the emulator's launch counter (None with the references)."""
    if request.param == "references":
        from cuda_util import use_references

        use_references(monkeypatch)
        yield None
        return
    import cuda_emu

    if cuda_emu.unavailable():
        pytest.skip(cuda_emu.unavailable())
    with cuda_emu.emulated(race_check=False) as stats:  # tests/test_cuda_kernels.py checks the kernels for races
        yield stats
    assert stats.launches > 0, "emulated, yet no kernel ran"


@pytest.fixture(scope="session")
def default_gguf(tmp_path_factory):
    from dgemma.plugin.default_model import ensure_default_model

    return ensure_default_model(tmp_path_factory.mktemp("default-model"))


@pytest.fixture(scope="session")
def canvas16_gguf(tmp_path_factory, checkpoint_factory):
    """The random-weight test model "base" (canvas 16, so that positions are re-noised; the default model's
    canvas is one token) at Q8_0: carried by scripts/gpu_prepare.sh to the GPU machine, whose transformers (5.17)
    is not the 5.23 the tests build with, else built here."""
    if CANVAS16.exists():
        return CANVAS16
    try:
        from dgemma.convert import convert

        path = tmp_path_factory.mktemp("canvas16") / "canvas16-q8.gguf"
        convert(checkpoint_factory(SPECS["base"]), path, "Q8_0", quiet=True)
        return path
    except ImportError as e:
        pytest.skip(f"no canvas-16 test model ({e}); run scripts/gpu_prepare.sh")


# ---- the GPU tests in pytest-xdist workers (scripts/gpu_check.sh) -----------------------------------------------
# A kernel's illegal address (or misaligned access, illegal instruction, launch failure) poisons its process's
# CUDA context: every later launch there fails. A worker that saw one ends once that test's reports are sent
# (xdist reports it crashed while running it, and starts another worker), so that the tests it would have run
# next run in a fresh process. Inert outside xdist.
CUDA_STICKY_ERRORS = ("an illegal memory access", "misaligned address", "an illegal instruction",
                      "unspecified launch failure", "CUDA_ERROR_ILLEGAL_ADDRESS", "CUDA_ERROR_MISALIGNED_ADDRESS",
                      "CUDA_ERROR_ILLEGAL_INSTRUCTION", "CUDA_ERROR_LAUNCH_FAILED")
_poisoned_by: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    yield
    if call.excinfo is not None and os.environ.get("PYTEST_XDIST_WORKER"):
        if any(s in f"{call.excinfo.typename}: {call.excinfo.value}" for s in CUDA_STICKY_ERRORS):
            _poisoned_by.append(item.nodeid)


@pytest.hookimpl(trylast=True)  # (after xdist's own, which sends the test's last report)
def pytest_runtest_logfinish(nodeid, location):
    if _poisoned_by:
        sys.stderr.write(f"{_poisoned_by[0]} left this worker's CUDA context unusable: the worker ends\n")
        sys.stderr.flush()
        os._exit(3)


# ---- `dgemma serve` on loopback over the default model (a test module may define its own `models` or `engine`) ----
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A models directory holding the default model, one per test module (its tests may add to it)."""
    from dgemma.plugin.default_model import ensure_default_model

    d = tmp_path_factory.mktemp("served")
    ensure_default_model(d)
    return d


@pytest.fixture(scope="module")
def server(models, tmp_path_factory) -> str:
    """The URL of a `dgemma serve` of `models` (its log in a temporary folder)."""
    from server_util import running_server

    with running_server(models, log=tmp_path_factory.mktemp("log") / "serve.log") as url:
        yield url


@pytest.fixture(scope="module")
def engine(models):
    """The default model of `models`, loaded in this process: what the server should answer, with none between."""
    from dgemma.plugin.engine import Engine

    return Engine.load(models / "default.gguf")

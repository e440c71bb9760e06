"""The kernels as the cuda backend compiles them at run time: NVRTC (the nvidia-cuda-nvrtc wheel, a dev
dependency; no GPU needed) with the loader's options and every name expression the wrappers ask for
(ops.MODULES), for the oldest and the newest target. nvcc (tests/test_csrc.py) compiles them another way,
with the C library and a host pass, so this is the check that the run-time path compiles: a template
NVRTC cannot instantiate, a header it lacks, a kernel the wrappers fetch that the module does not export."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from dgemma.plugin.cuda import ops
from dgemma.plugin.cuda.loader import NVRTC_OPTIONS, csrc_dir, module_source

ARCHS = ("compute_75", "compute_90")  # the loader's minimum (the tiles on sm_75's MMAs, no cp.async) and Hopper


def _nvrtc() -> ctypes.CDLL | None:
    try:
        import nvidia
    except ImportError:
        return None
    for root in nvidia.__path__:
        lib = Path(root) / "cu13" / "lib"
        builtins = sorted(lib.glob("libnvrtc-builtins.so.13.*"))  # 13.0, 13.5, ...: the wheel's minor version
        if (lib / "libnvrtc.so.13").exists() and builtins:
            # loaded first, globally, so that libnvrtc's dlopen of it by name finds it without LD_LIBRARY_PATH
            ctypes.CDLL(str(builtins[0]), mode=os.RTLD_GLOBAL)
            return ctypes.CDLL(str(lib / "libnvrtc.so.13"))
    return None


NVRTC = _nvrtc()
pytestmark = pytest.mark.skipif(NVRTC is None, reason="no NVRTC (pip install nvidia-cuda-nvrtc, in the dev extra)")


def compile_ptx(source: str, names: tuple[str, ...], arch: str, extra: tuple[str, ...] = ()) -> tuple[str, dict[str, str]]:
    """NVRTC's PTX for csrc/<source> and the lowered name of each name expression; AssertionError with
    NVRTC's log when it fails."""
    lib, c = NVRTC, ctypes
    prog = c.c_void_p()
    code = module_source(source).encode()  # the text the loader hands CuPy
    assert lib.nvrtcCreateProgram(c.byref(prog), code, source.encode(), 0, None, None) == 0
    try:
        for n in names:
            assert lib.nvrtcAddNameExpression(prog, n.encode()) == 0
        opts = [o.encode() for o in (*NVRTC_OPTIONS, *extra, f"-I{csrc_dir()}", f"-arch={arch}")]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (c.c_char_p * len(opts))(*opts))
        size = c.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, c.byref(size))
        log = c.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        assert rc == 0, f"NVRTC failed on {source} for {arch}:\n{log.value.decode()[:4000]}"
        lowered = {}
        for n in names:
            out = c.c_char_p()
            assert lib.nvrtcGetLoweredName(prog, n.encode(), c.byref(out)) == 0, n
            lowered[n] = out.value.decode()
        lib.nvrtcGetPTXSize(prog, c.byref(size))
        ptx = c.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, ptx)
        return ptx.value.decode(), lowered
    finally:
        lib.nvrtcDestroyProgram(c.byref(prog))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source,names,plain", ops.MODULES, ids=lambda v: v if isinstance(v, str) else "")
def test_runtime_compile_of_every_kernel_the_wrappers_launch(source, names, plain, arch):
    ptx, lowered = compile_ptx(source, names, arch)
    for name in (*lowered.values(), *plain):
        assert f".entry {name}(" in ptx, f"{source}: no kernel {name} in the PTX for {arch}"


def test_every_kernel_call_in_the_wrappers_is_listed():
    """ops.MODULES is what the wrappers compile: each kernel(...) call's source appears in it."""
    import re

    text = "".join((Path(ops.__file__).parent / f).read_text() for f in ("ops.py", "head_ops.py", "moe_ops.py"))
    called = set(re.findall(r'kernel\("([a-z_0-9]+\.cu)"', text)) | set(re.findall(r'_launch_matmul\("([a-z_0-9]+\.cu)"', text))
    assert called and called <= {m[0] for m in ops.MODULES}
    assert {m[0] for m in ops.MODULES} == {p.name for p in csrc_dir().glob("*.cu")}  # every kernel file is launched


@pytest.mark.parametrize("arch", ["75", "90"])
def test_cupy_compiles_every_module_as_the_loader_asks(arch, monkeypatch):
    """Through CuPy's own NVRTC path (what RawModule runs: its options, -ftz=true among them, and name
    expressions), without a GPU: only its device query is replaced by a fixed target. Skipped without CuPy
    (not a dev dependency: a CuPy for the wrong CUDA breaks a GPU machine's); the check that a pip CuPy
    finds a pip NVRTC with no CUDA toolkit installed."""
    pytest.importorskip("cupy")
    from cupy.cuda import compiler

    if not hasattr(compiler, "_get_arch_for_options_for_nvrtc"):
        pytest.skip("this CuPy has no _get_arch_for_options_for_nvrtc to point at a target")
    monkeypatch.setattr(compiler, "_get_arch_for_options_for_nvrtc", lambda arch=None: (f"-arch=sm_{arch}", "cubin"))
    for source, names, _ in ops.MODULES:
        code = module_source(source)
        binary, mapping = compiler.compile_using_nvrtc(code, options=(*NVRTC_OPTIONS, f"-I{csrc_dir()}", "-ftz=true"),
                                                       arch=arch, name_expressions=list(names) or None)
        assert binary[:4] == b"\x7fELF" and set(mapping or {}) == set(names), source


def test_the_loaders_source_names_every_header(tmp_path, monkeypatch):
    """CuPy's disk cache keys on the source text and the options, not on the headers it includes: the text the
    loader hands it carries a digest of every csrc/ file, so a change to one header alone compiles afresh; and
    NVRTC's messages still name the file and its own line numbers (#line)."""
    import shutil

    from dgemma.plugin.cuda import loader

    copy = tmp_path / "csrc"
    shutil.copytree(csrc_dir(), copy)
    monkeypatch.setattr(loader, "csrc_dir", lambda: copy)
    loader.csrc_digest.cache_clear()
    try:
        before = loader.module_source("accept.cu")
        assert before.endswith((copy / "accept.cu").read_text()) and '#line 1 "accept.cu"' in before
        (copy / "quant" / "base.cuh").write_text((copy / "quant" / "base.cuh").read_text() + "\n// edited\n")
        loader.csrc_digest.cache_clear()
        after = loader.module_source("accept.cu")
        assert after != before and after.splitlines()[1:] == before.splitlines()[1:]  # only the digest line
    finally:
        loader.csrc_digest.cache_clear()


@pytest.mark.parametrize("source", ["qmatmul_mma.cu", "qmatmul_q8.cu"])
def test_the_tiles_take_sm75s_instructions_where_asked(source):
    """The tiles on compute_75, and on compute_90 with -DDG_SM75_PATH (tests/test_cuda_turing.py's GPU run),
    are made of sm_75's MMAs (m16n8k8 f16, m8n8k16 s8) with no cp.async; compute_90 itself of m16n8k16 and
    cp.async."""
    names = tuple(n for m in ops.MODULES if m[0] == source for n in m[1])[:2]
    turing = [compile_ptx(source, names, "compute_75")[0], compile_ptx(source, names, "compute_90", ("-DDG_SM75_PATH",))[0]]
    ampere = compile_ptx(source, names, "compute_90")[0]
    sm75_mma = "mma.sync.aligned.m16n8k8" if source == "qmatmul_mma.cu" else "mma.sync.aligned.m8n8k16"
    for ptx in turing:
        assert sm75_mma in ptx and "m16n8k16" not in ptx and "cp.async" not in ptx
    assert sm75_mma not in ampere and "m16n8k16" in ampere and "cp.async" in ampere


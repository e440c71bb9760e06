"""dgemma's CUDA kernels on the CPU: csrc/*.cu compiled by g++ against tests/cuda_emu.h (a fiber per CUDA thread)
and launched through the ops wrappers, so tests/test_cuda_kernels.py runs the real kernels without a GPU.

`emulated()` patches plugin/cuda/ops.py and head_ops.py (moe_ops.py launches through ops; its torch is patched too) for the duration: kernel() compiles the module for
the CPU (cached on disk by content), _launch() runs it on CPU tensors, each passed in a buffer that ends at
an inaccessible page (a read or write past its end is an error naming the kernel, block, thread and
argument), tensors claim to be on a GPU (an H100's capability; with arch=75 a Turing GPU's, the kernels
compiled with DG_SM75_PATH: the tensor-core tiles on sm_75's instructions), and the wrappers' torch.empty outputs
start as 0xFF bytes (NaN), so an element no thread writes shows. With race_check each launch runs twice,
the threads of every block in opposite orders, and any difference in any buffer is an error.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import pytest
import torch

from cuda_util import KERNEL_SIGNATURE

from dgemma.plugin.cuda import head_ops, moe_ops, ops
from dgemma.plugin.cuda.loader import csrc_dir

HEADER = Path(__file__).with_name("cuda_emu.h")  # which includes cuda_emu_warp.h beside it
HEADERS = (HEADER, HEADER.with_name("cuda_emu_warp.h"))
# -fno-gnu-unique, -fvisibility=hidden: each module keeps its own emulator state and template statics (g++
# makes them process-wide "unique" symbols otherwise); -ftrivial-auto-var-init=pattern: an uninitialised
# local reads as a pattern (-1.7e38), not as whatever the stack held; -fsanitize=alignment: a load or store
# through a pointer misaligned for its type traps, as a GPU faults on it ("misaligned address") where x86 goes on;
# -mno-red-zone: with the red zone, g++ 12's -ftrivial-auto-var-init=pattern initialised a 16-aligned local of
# a kernel's leaf function (csrc's Words4) 8 bytes off its alignment with a vmovdqa, which faulted (without
# the pattern, or without the red zone, test_get_rows_f16_is_get_rows_rounded[emu-2] passes)
FLAGS = ("-std=c++17", "-O2", "-march=native", "-fPIC", "-shared", "-ffp-contract=off", "-fno-strict-aliasing",
         "-fsanitize=bounds,alignment", "-fsanitize-undefined-trap-on-error", "-ftrivial-auto-var-init=pattern",
         "-fno-gnu-unique", "-fvisibility=hidden", "-U_FORTIFY_SOURCE", "-w", "-mno-red-zone")
DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]\s*;")


class EmulatorError(RuntimeError):
    """A kernel did something a GPU would not survive (or would do differently each run)."""


@lru_cache(maxsize=1)
def unavailable() -> str | None:
    """Why the emulator cannot run here, or None."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the CUDA emulator needs Linux on x86-64 (this is {platform.system()} {platform.machine()})"
    if shutil.which("g++") is None:
        return "the CUDA emulator needs g++"
    version = subprocess.run(["g++", "-dumpversion"], capture_output=True, text=True).stdout.strip()
    if int(version.split(".")[0] or 0) < 12:  # -ftrivial-auto-var-init
        return f"the CUDA emulator needs g++ 12 or newer (this is {version})"
    return None


def _expressions(filename: str) -> tuple[str, ...]:
    """Every kernel of csrc/<filename> the wrappers fetch: the loader's name expressions and plain names."""
    names: list[str] = []
    for source, exprs, plain in ops.MODULES:
        if source == filename:
            names += [n for n in (*exprs, *plain) if n not in names]
    if not names:
        raise EmulatorError(f"csrc/{filename} is not among ops.MODULES")
    return tuple(names)


def _cache_dir() -> Path:
    path = Path(os.environ.get("DGEMMA_EMU_CACHE", Path(tempfile.gettempdir()) / "dgemma-cuda-emu"))
    path.mkdir(parents=True, exist_ok=True)
    return path


SHARED = re.compile(r"^([ \t]*)__shared__\s+([^;{}]*);", re.M)


def _split_declarators(decl: str) -> list[str]:
    """'float a[2][3], b[4]' -> ['float a[2][3]', 'b[4]'] (commas inside brackets stay)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(decl):
        depth += ch in "[(" and 1 or (ch in "])" and -1 or 0)
        if ch == "," and depth == 0:
            parts.append(decl[start:i])
            start = i + 1
    return parts + [decl[start:]]


def for_emulator(code: str) -> str:
    """CUDA source as the emulator compiles it: `extern __shared__ T name[];` becomes a pointer to the launch's
    dynamic shared memory (a function-local static cannot be extern), and every other __shared__ declaration
    is followed, on the same line, by the call that fills it with 0xFF bytes once per block."""
    code = DYNAMIC_SHARED.sub(r"\1 * \2 = (\1 *)::emu::dynamic_shared();", code)

    def poison(m: re.Match) -> str:
        decl = re.sub(r"__align__\(\s*\d+\s*\)", " ", m.group(2))
        names = [re.search(r"(\w+)\s*(?:\[[^\]]*\]\s*)*$", part.strip()).group(1) for part in _split_declarators(decl)]
        return m.group(0) + "".join(f" ::emu::poison_shared(&{n}, sizeof({n}));" for n in names)

    return SHARED.sub(poison, code)


@lru_cache(maxsize=1)
def _machine() -> bytes:
    """What -march=native builds for: the compiler's version and this CPU's flags (a cache on another
    machine must not be reused)."""
    version = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return (version + flags).encode()


def _tree(src: Path) -> tuple[Path, str]:
    """csrc/ as the emulator compiles it (for_emulator on every file), cached by content; and its digest."""
    files = sorted(p for p in src.rglob("*") if p.suffix in (".cu", ".cuh"))
    digest = hashlib.sha256(b"".join(h.read_bytes() for h in HEADERS) + Path(__file__).read_bytes() + " ".join(FLAGS).encode() + _machine())
    for path in files:
        digest.update(str(path.relative_to(src)).encode() + path.read_bytes())
    key = digest.hexdigest()[:16]
    tree = _cache_dir() / f"csrc-{key}"
    if not tree.exists():
        tmp = tree.with_name(f"{tree.name}.{os.getpid()}.tmp")
        for path in files:
            out = tmp / path.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(for_emulator(path.read_text()))
        try:
            os.replace(tmp, tree)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return tree, key


class Module:
    """One .cu file compiled for the CPU (csrc/<name> by default), its kernels by name: `names` are the name
    expressions (dg::qmatmul<12>) and extern "C" names to look up."""

    def __init__(self, filename: str, names: tuple[str, ...] | None = None, directory: Path | None = None,
                 arch: int = 90):
        tree, key = _tree(csrc_dir())
        code = (tree / filename).read_text() if directory is None else for_emulator((directory / filename).read_text())
        names = names or _expressions(filename)
        # an extern "C" kernel may share its name with a device function (head_merge): name it by its type
        c_types = {name: ", ".join(p.rsplit(None, 1)[0] for p in params.split(","))
                   for name, params in KERNEL_SIGNATURE.findall(code) if name in names}
        table = ",\n".join(f"    EMU_KERNEL({n})" if n not in c_types else
                           f"    ::emu::kernel_info<static_cast<void (*)({c_types[n]})>(&{n})>(\"{n}\")" for n in names)
        unit = (f'#line 1 "{filename}"\n{code}\n\nusing namespace dg;\n'
                f"const emu::Kernel emu_kernels[] = {{\n{table}\n}};\nconst int emu_kernel_total = {len(names)};\n")
        defines = ["-DDG_SM75_PATH"] if arch < 80 else []  # sm_75's instructions (cuda_emu_warp.h, mma_tile.cuh)
        digest = hashlib.sha256(key.encode() + unit.encode() + " ".join(defines).encode()).hexdigest()[:16]
        out = _cache_dir() / f"{Path(filename).stem}-{digest}.so"
        if not out.exists():
            cpp = out.with_suffix(f".{os.getpid()}.cpp")
            cpp.write_text(unit)
            tmp = out.with_suffix(f".{os.getpid()}.tmp")
            cmd = ["g++", *FLAGS, *defines, f"-I{tree}", "-include", str(HEADER), str(cpp), "-o", str(tmp)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            cpp.unlink()
            if done.returncode != 0:
                raise EmulatorError(f"g++ could not compile {filename} for the emulator:\n{done.stderr[-4000:]}")
            os.replace(tmp, out)  # whole or not at all: another process may be reading the cache
        lib = ctypes.CDLL(str(out))
        lib.emu_kernel_name.restype = ctypes.c_char_p
        lib.emu_guarded.restype = ctypes.c_void_p
        lib.emu_guarded.argtypes = (ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                    ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t))
        lib.emu_release.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        lib.emu_atomics.restype = ctypes.c_long
        lib.emu_launch.argtypes = (ctypes.c_int, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
                                   ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                   ctypes.c_int, ctypes.POINTER(ctypes.c_size_t))
        self.lib = lib
        self.kernels: dict[str, Kernel] = {}
        for i in range(lib.emu_kernel_count()):
            sizes = (ctypes.c_int * 64)()
            count = lib.emu_kernel_params(i, sizes)
            name = lib.emu_kernel_name(i).decode()
            self.kernels[name] = Kernel(self, i, name, tuple(sizes[:count]))


class Kernel:
    def __init__(self, module: Module, index: int, name: str, param_sizes: tuple[int, ...]):
        self.module, self.index, self.name, self.param_sizes = module, index, name, param_sizes


@lru_cache(maxsize=None)
def module(filename: str, arch: int = 90) -> Module:
    return Module(filename, arch=arch)


def kernel(filename: str, name: str, name_expressions: tuple[str, ...] = (), arch: int = 90) -> Kernel:
    """loader.kernel's emulated twin (arch 75: compiled as for a Turing GPU)."""
    mod = module(filename, arch)
    if name not in mod.kernels:
        raise EmulatorError(f"csrc/{filename} has no kernel {name} among {sorted(mod.kernels)}")
    return mod.kernels[name]


def _extent(t: torch.Tensor) -> int:
    """Bytes from t's first element to just past its last (strides are never negative in torch)."""
    if t.numel() == 0:
        return 0
    return (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) * t.element_size()


class _Buffers:
    """The tensor arguments' bytes, each copied into a guarded buffer: a tensor alone on its storage gets just
    its view's bytes (a read past the view's end faults even inside the storage), tensors sharing a storage
    share a copy of all of it. at_end: the buffers touch the inaccessible page after them, else the one
    before (a read before the start faults); `fill`: the byte the rest of their pages holds."""

    def __init__(self, lib, args: tuple, at_end: bool, fill: int):
        self.lib = lib
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        users: dict[int, list[torch.Tensor]] = {}
        for t in tensors:
            users.setdefault(t.untyped_storage().data_ptr(), []).append(t)
        self.regions: dict[int, tuple[int, int, int, int, int, torch.Tensor]] = {}  # key -> src, n, ptr, base, span, t
        self.args = args
        for key, ts in users.items():
            t = ts[0]
            alone = all(u.data_ptr() == t.data_ptr() and u.shape == t.shape and u.stride() == t.stride() for u in ts)
            src, n = (t.data_ptr(), _extent(t)) if alone else (key, t.untyped_storage().nbytes())
            align = max(u.element_size() for u in ts)
            base, span = ctypes.c_void_p(), ctypes.c_size_t()
            ptr = lib.emu_guarded(n, align, int(at_end), fill, ctypes.byref(base), ctypes.byref(span))
            if not ptr:
                raise MemoryError(f"the emulator could not map {n} bytes")
            if n:
                ctypes.memmove(ptr, src, n)
            self.regions[key] = (src, n, ptr, base.value, span.value, t)

    def address(self, t: torch.Tensor) -> int:
        src, _, ptr, _, _, _ = self.regions[t.untyped_storage().data_ptr()]
        return ptr + (t.data_ptr() - src)

    def snapshot(self) -> list[bytes]:
        return [ctypes.string_at(ptr, n) for _, n, ptr, _, _, _ in self.regions.values()]

    def copy_back(self) -> None:
        for src, n, ptr, _, _, _ in self.regions.values():
            if n:
                ctypes.memmove(src, ptr, n)

    def release(self) -> None:
        for _, _, _, base, span, _ in self.regions.values():
            self.lib.emu_release(base, span)
        self.regions.clear()

    def which(self, address: int) -> str:
        """The argument(s) whose buffer's guard pages hold `address`."""
        for key, (src, n, ptr, base, span, t) in self.regions.items():
            if base <= address < base + span:
                idx = [i for i, a in enumerate(self.args)
                       if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == key]
                return (f"; that is byte {address - ptr} of argument {'/'.join(map(str, idx))}'s {n}-byte buffer "
                        f"({t.dtype} {tuple(t.shape)})")
        return ""


def _dims(d) -> tuple[int, int, int]:
    d = tuple(int(v) for v in (d if isinstance(d, (tuple, list)) else (d,)))
    return d + (1,) * (3 - len(d))


def _packed(fn: Kernel, i: int, a, size: int, bufs: _Buffers | None):
    """Argument i as CuPy packs it (checked against the parameter's size): a ctypes value."""
    if isinstance(a, torch.Tensor):
        v = ctypes.c_uint64(bufs.address(a) if bufs else 0)
    elif a is None:
        v = ctypes.c_uint64(0)
    elif isinstance(a, np.generic):
        v = ctypes.create_string_buffer(a.tobytes(), a.nbytes)
    elif isinstance(a, int):  # as CuPy packs a Python int (and bool): 8 bytes
        v = ctypes.c_int64(a)
    elif isinstance(a, float):
        v = ctypes.c_double(a)
    else:
        raise EmulatorError(f"{fn.name}: argument {i} is a {type(a).__name__}")
    width = a.nbytes if isinstance(a, np.generic) else ctypes.sizeof(v)
    if width != size:
        raise EmulatorError(f"{fn.name}: argument {i} ({type(a).__name__}) is {width} bytes where the "
                            f"kernel's parameter {i} takes {size}")
    return v


FORWARD_FILL, REVERSE_FILL = 0xFF, 0x7F  # unwritten shared memory: NaN / -1, then 3.4e38 / 2139062143


def launch(fn: Kernel, grid, block, args: tuple, shared_mem: int = 0, race_check: bool = True) -> None:
    """Run kernel fn over grid x block on CPU tensors (and numpy scalars), as CuPy would on a GPU; raises
    EmulatorError for what a GPU would fault on, or, with race_check, for results that depend on the order
    of the threads (the second run: blocks, warps and lanes in reverse order, other bytes in unwritten
    shared memory, the buffers against the page before them instead of after)."""
    if len(args) != len(fn.param_sizes):
        raise EmulatorError(f"{fn.name}: {len(args)} arguments for {len(fn.param_sizes)} parameters")
    for a in args:
        if isinstance(a, torch.Tensor) and a.device.type != "cpu":
            raise EmulatorError(f"{fn.name}: the emulator takes CPU tensors (got one on {a.device})")
    for i, (a, size) in enumerate(zip(args, fn.param_sizes)):
        _packed(fn, i, a, size, None)  # the sizes, before anything is copied
    lib = fn.module.lib
    g, b = (ctypes.c_uint * 3)(*_dims(grid)), (ctypes.c_uint * 3)(*_dims(block))

    def run(reverse: bool) -> _Buffers:
        fill = REVERSE_FILL if reverse else FORWARD_FILL
        bufs = _Buffers(lib, args, at_end=not reverse, fill=fill)
        try:
            values = [_packed(fn, i, a, size, bufs) for i, (a, size) in enumerate(zip(args, fn.param_sizes))]
            raw = (ctypes.c_void_p * max(1, len(args)))(*(ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values))
            msg, fault = ctypes.create_string_buffer(512), ctypes.c_size_t()
            if lib.emu_launch(fn.index, g, b, int(shared_mem), raw, int(reverse), fill, msg, 512, ctypes.byref(fault)):
                where = bufs.which(fault.value) if fault.value else ""
                raise EmulatorError(f"{fn.name}<<<{_dims(grid)}, {_dims(block)}>>>: {msg.value.decode()}{where}")
        except BaseException:
            bufs.release()
            raise
        return bufs

    backwards = None
    if race_check:
        bufs = run(reverse=True)
        backwards = bufs.snapshot()
        bufs.release()
    bufs = run(reverse=False)
    try:
        if backwards is not None:
            _same_both_ways(fn, grid, block, bufs, backwards, atomics=lib.emu_atomics() > 0)
        bufs.copy_back()
    finally:
        bufs.release()


def _same_both_ways(fn: Kernel, grid, block, bufs: _Buffers, backwards: list[bytes], atomics: bool) -> None:
    """Every buffer as the reverse-order run left it: bit for bit, except that float32 buffers may differ by
    the rounding of a different order of atomicAdd (1e-5 relative) when the launch used atomics."""
    for i, (fwd, bwd, (_, n, _, _, _, t)) in enumerate(zip(bufs.snapshot(), backwards, bufs.regions.values())):
        if fwd == bwd:
            continue
        if atomics and t.dtype == torch.float32:
            a, b = np.frombuffer(fwd, np.float32), np.frombuffer(bwd, np.float32)
            if np.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True):
                continue
        at = next(j for j in range(n) if fwd[j] != bwd[j])
        raise EmulatorError(f"{fn.name}<<<{_dims(grid)}, {_dims(block)}>>>: buffer {i} ({t.dtype} {tuple(t.shape)}) "
                            f"differs at byte {at} between runs in opposite thread orders (a race, or a read of "
                            "shared memory no thread wrote)")


class _PoisonedTorch:
    """torch, except that empty() and empty_like() fill new tensors with 0xFF bytes (NaN, -1)."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs) -> torch.Tensor:
        t = torch.empty(*args, **kwargs)
        t.untyped_storage().fill_(0xFF)
        return t

    @staticmethod
    def empty_like(*args, **kwargs) -> torch.Tensor:
        t = torch.empty_like(*args, **kwargs)
        t.untyped_storage().fill_(0xFF)
        return t


@contextlib.contextmanager
def emulated(race_check: bool = True, arch: int = 90) -> Iterator[SimpleNamespace]:
    """The ops wrappers launch the emulated kernels on CPU tensors until the block ends, on a GPU of compute
    capability 9.0 (arch 90) or 7.5 (arch 75: the kernels compiled as for sm_75). Yields the launch count
    (`.launches`)."""
    reason = unavailable()
    if reason:
        raise EmulatorError(reason)
    stats = SimpleNamespace(launches=0)

    def counted(fn, grid, block, args, shared_mem: int = 0) -> None:
        stats.launches += 1
        launch(fn, grid, block, tuple(args), shared_mem, race_check)

    with pytest.MonkeyPatch.context() as mp:
        patch = mp.setattr
        patch(torch.Tensor, "is_cuda", property(lambda self: True))
        patch(torch.cuda, "get_device_capability", lambda device=None: divmod(arch, 10))
        patch(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(multi_processor_count=132))
        for mod in (ops, head_ops):
            patch(mod, "kernel", functools.partial(kernel, arch=arch))
            patch(mod, "_launch", counted)
            patch(mod, "torch", _PoisonedTorch())
        patch(moe_ops, "torch", _PoisonedTorch())  # its outputs too (it launches through ops' kernel and _launch)
        yield stats

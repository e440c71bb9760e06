"""Host RAM before a load (plugin/hostmem.py): /proc/meminfo bounded by the memory limit of the process's cgroup,
v2 and v1, on cgroup trees written into tmp_path the way the kernel lays them out."""

from __future__ import annotations

from pathlib import Path

import pytest

from dgemma.plugin import hostmem
from dgemma.plugin.hostmem import available_ram, cgroup_available, meminfo_available

MEMINFO = "MemTotal:       24588352 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\nSwapFree:   1000 kB\n" \
          "HugePages_Total:       0\n"
V1_NO_LIMIT = "9223372036854771712"  # what cgroup v1 shows for "no limit"


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


def test_meminfo():
    assert meminfo_available(MEMINFO) == 20001000 * 1024
    assert meminfo_available(MEMINFO, swap=False) == 20000000 * 1024
    assert meminfo_available("MemFree: 100 kB\n") is None


def test_v2_the_tightest_limit_on_the_path_with_the_reclaimable_cache_and_the_swap_allowed(tmp_path):
    write(tmp_path, {
        "cgroup.controllers": "cpu memory",
        "user.slice/memory.max": "max",  # no limit
        "user.slice/memory.current": "7000000",
        "user.slice/app/memory.max": "1000000",
        "user.slice/app/memory.current": "400000",
        "user.slice/app/memory.stat": "anon 350000\nfile 50000\ninactive_file 30000\nactive_file 20000",
        "user.slice/app/memory.swap.max": "300000",
        "user.slice/app/memory.swap.current": "100000",
    })
    here = "0::/user.slice/app\n"
    assert cgroup_available(here, tmp_path, swap_free=10**9, swap=False) == 600000 + 30000
    assert cgroup_available(here, tmp_path, swap_free=10**9) == 630000 + 200000  # the cgroup's swap allowance
    assert cgroup_available(here, tmp_path, swap_free=5000) == 630000 + 5000  # ... or the machine's free swap
    write(tmp_path, {"user.slice/app/memory.swap.max": "max"})
    assert cgroup_available(here, tmp_path, swap_free=7) == 630000 + 7
    write(tmp_path, {"user.slice/memory.max": "500000", "user.slice/memory.current": "450000"})  # the parent's
    assert cgroup_available(here, tmp_path, swap=False) == 50000
    write(tmp_path, {"user.slice/app/memory.current": "1200000"})  # over the limit (reclaim pending): not negative
    assert cgroup_available(here, tmp_path, swap=False) == 30000


def test_v2_inside_a_container_and_without_a_limit(tmp_path):
    write(tmp_path, {"cgroup.controllers": "memory", "memory.max": "2000000", "memory.current": "500000"})
    # the path the kernel names is the host's: not under the container's mount, whose root is its cgroup
    assert cgroup_available("0::/docker/0123abcd\n", tmp_path, swap=False) == 1500000  # (no memory.stat: 0 cache)
    write(tmp_path, {"memory.max": "max"})
    assert cgroup_available("0::/\n", tmp_path) is None
    assert cgroup_available("0::/\n", tmp_path / "nothing") is None
    assert cgroup_available("", tmp_path) is None


def test_v1_memory_controller(tmp_path):
    mount = tmp_path / "memory"
    write(mount, {
        "memory.limit_in_bytes": V1_NO_LIMIT,
        "memory.usage_in_bytes": "9000000",
        "process_api/abc/memory.limit_in_bytes": V1_NO_LIMIT,
        "process_api/abc/memory.usage_in_bytes": "3000000",
        "process_api/abc/memory.stat": "cache 2000000\ninactive_file 1500000\ntotal_inactive_file 1800000",
    })
    here = "9:name=systemd:/\n4:memory:/process_api/abc\n3:cpuset:/\n0::/\n"  # (a hybrid layout: v1's wins)
    assert cgroup_available(here, tmp_path) is None
    write(mount, {"process_api/abc/memory.limit_in_bytes": "4000000"})
    assert cgroup_available(here, tmp_path, swap=False) == 1000000 + 1800000
    assert cgroup_available(here, tmp_path, swap_free=123) == 2800000 + 123
    # memsw bounds memory and swap together: Docker's --memory-swap equal to --memory allows no swap
    write(mount, {"process_api/abc/memory.memsw.limit_in_bytes": "4000000",
                  "process_api/abc/memory.memsw.usage_in_bytes": "3000000"})
    assert cgroup_available(here, tmp_path, swap_free=10**9) == 2800000
    write(mount, {"process_api/abc/memory.memsw.limit_in_bytes": "4500000"})  # 0.5 MB of swap allowed
    assert cgroup_available(here, tmp_path, swap_free=10**9) == 2800000 + 500000
    # a limit on an ancestor the mount does not show, as the kernel reports it in memory.stat
    write(mount, {"process_api/abc/memory.stat": "total_inactive_file 0\nhierarchical_memory_limit 3500000"})
    assert cgroup_available(here, tmp_path, swap=False) == 500000


def test_available_ram_is_the_smaller_and_gates_a_load(tmp_path, monkeypatch, default_gguf):
    """meminfo with a container limit below it: the limit; a torch-backend load that the machine would hold
    but the container would not is the one-line RamShortageError, before anything is loaded."""
    from dgemma.plugin.config import ModelConfig
    from dgemma.plugin.engine import Engine, RamShortageError
    from dgemma.plugin.inspect import open_gguf
    from dgemma.plugin.weights import float32_bytes

    monkeypatch.setattr(hostmem, "PROC_MEMINFO", write(tmp_path, {"meminfo": MEMINFO}) / "meminfo")
    monkeypatch.setattr(hostmem, "PROC_CGROUP", write(tmp_path, {"cgroup": "0::/\n"}) / "cgroup")
    monkeypatch.setattr(hostmem, "CGROUP_ROOT", tmp_path / "fs")
    assert available_ram() == meminfo_available(MEMINFO)  # no cgroup files: meminfo alone
    path = default_gguf
    need = float32_bytes(open_gguf(path), ModelConfig.from_gguf(open_gguf(path), path))
    write(tmp_path / "fs", {"memory.max": str(need + 999), "memory.current": "1000", "memory.swap.max": "0",
                            "memory.swap.current": "0"})  # (no swap in the container)
    assert available_ram() == need - 1 < meminfo_available(MEMINFO)
    with pytest.raises(RamShortageError, match=r"has 0\.0 GiB of memory available"):
        Engine.load(path, "torch")
    write(tmp_path / "fs", {"memory.current": "999"})
    assert Engine.load(path, "torch").cfg.n_layer > 0
    monkeypatch.setattr(hostmem, "PROC_MEMINFO", tmp_path / "none")
    assert available_ram() is None  # not Linux: not known, not checked


def test_this_machine():
    """This machine's own /proc and /sys/fs/cgroup, read once: whatever its cgroups say, they parse, and the
    figure is a number no larger than meminfo's."""
    meminfo, cgroup = Path("/proc/meminfo"), Path("/proc/self/cgroup")
    if not meminfo.exists() or not cgroup.exists():
        pytest.skip("not Linux")
    text = meminfo.read_text()
    have = meminfo_available(text, swap=False)
    limited = cgroup_available(cgroup.read_text(), swap=False)
    assert have > 0 and (limited is None or limited >= 0)


def test_windows(monkeypatch):
    """GlobalMemoryStatusEx through ctypes (a stand-in kernel32 here): available physical memory without swap,
    the commit limit's remainder with it; None where the call fails."""
    import ctypes
    import sys

    calls = []

    class Kernel32:
        ok = 1

        @staticmethod
        def GlobalMemoryStatusEx(ref) -> int:  # noqa: N802 - the Win32 name
            status = ref._obj
            calls.append(status.dwLength)
            status.ullAvailPhys, status.ullAvailPageFile = 5 << 30, 9 << 30
            return Kernel32.ok

    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(ctypes, "windll", type("windll", (), {"kernel32": Kernel32}), raising=False)
    monkeypatch.setattr(hostmem, "PROC_MEMINFO", Path("/nonexistent"))  # (not read on Windows)
    assert available_ram(swap=False) == 5 << 30 and available_ram() == 9 << 30
    assert calls == [64, 64]  # dwLength: MEMORYSTATUSEX's size, as the call wants it
    Kernel32.ok = 0
    assert available_ram() is None


VM_STAT = """Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                               12345.
Pages active:                            234567.
Pages inactive:                          223344.
Pages speculative:                         1234.
Pages throttled:                              0.
Pages wired down:                         98765.
Pages purgeable:                           4321.
"Translation faults":                 123456789.
Pages copy-on-write:                    1234567.
Pages stored in compressor:              345678.
Swapins:                                      0.
"""


def test_macos(monkeypatch):
    """vm_stat's free, speculative and inactive pages times its page size (psutil's "available"); None where
    vm_stat does not run, fails, or lacks the lines."""
    import subprocess
    import sys

    from dgemma.plugin.hostmem import vm_stat_available

    assert vm_stat_available(VM_STAT) == (12345 + 1234 + 223344) * 16384
    assert vm_stat_available(VM_STAT.replace("Pages inactive", "Pages gone")) is None
    assert vm_stat_available(VM_STAT.replace("page size of", "pages of")) is None
    runs = []

    def run(cmd, **kw):
        runs.append(cmd)
        if state["missing"]:
            raise FileNotFoundError(cmd[0])
        return subprocess.CompletedProcess(cmd, state["rc"], VM_STAT, "")

    state = {"missing": False, "rc": 0}
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(hostmem, "PROC_MEMINFO", Path("/nonexistent"))  # (not read on macOS)
    assert available_ram() == available_ram(swap=False) == (12345 + 1234 + 223344) * 16384
    assert runs == [["/usr/bin/vm_stat"]] * 2
    state["rc"] = 1
    assert available_ram() is None
    state["missing"] = True
    assert available_ram() is None

"""How much host RAM a load can still take: /proc/meminfo's MemAvailable, bounded by the memory limit of the
process's cgroup where it has one (a Docker or Kubernetes container, a systemd slice), which meminfo does not
show: a container limited to 16 GiB on a 64 GiB machine sees 64 in meminfo, and the kernel ends the process
past 16. On Windows, GlobalMemoryStatusEx; on macOS, vm_stat's free and inactive pages. The checks before a
load (plugin/weights.py ram_shortage, plugin/cuda/offload.py host_ram_shortage) and before a KV cache is put
aside in host memory (plugin/kv_cache.py) read available_ram."""

from __future__ import annotations

import ctypes
import re
import subprocess
import sys
from pathlib import Path

PROC_MEMINFO = Path("/proc/meminfo")
PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")  # cgroup v2's mount; v1's memory controller is under it, in memory/
V1_UNLIMITED = 1 << 62  # cgroup v1 writes "no limit" as 2**63 - 1 rounded down to a page


def _numbers(text: str) -> dict[str, int]:
    """Lines of a name and a number as {name: number}: /proc/meminfo's "MemAvailable:   123 kB" (KiB), a cgroup's
    memory.stat "inactive_file 123" (bytes)."""
    out = {}
    for line in text.splitlines():
        parts = line.replace(":", " ", 1).split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _meminfo(kib: dict[str, int], swap: bool) -> int | None:
    if "MemAvailable" not in kib:
        return None
    return (kib["MemAvailable"] + (kib.get("SwapFree", 0) if swap else 0)) * 1024


def meminfo_available(text: str, swap: bool = True) -> int | None:
    """Bytes a process can still get, from /proc/meminfo's text: MemAvailable plus SwapFree (swap False: without,
    for page-locked memory); None without them."""
    return _meminfo(_numbers(text), swap)


def _read_int(path: Path) -> int | None:
    """A cgroup file's number; None where it is missing, unreadable or "max" (no limit)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat(d: Path) -> dict[str, int]:
    """A cgroup's memory.stat ({} where it is not there)."""
    try:
        return _numbers((d / "memory.stat").read_text())
    except OSError:
        return {}


def _dirs(mount: Path, relative: str) -> list[Path]:
    """The process's cgroup and its ancestors as far as `mount` shows them, innermost first. Inside a container
    the path /proc/self/cgroup names is often not there (the mount is the container's own cgroup): the mount."""
    parts = [p for p in relative.strip().strip("/").split("/") if p and p != ".."]
    return [d for d in (mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)) if d.is_dir()]


def _room(limit: int | None, usage: int | None, cache: int) -> int | None:
    """What a cgroup's limit still allows: limit less usage (0 past it) plus the reclaimable cache; None where it
    has no limit or the files are not there."""
    if limit is None or usage is None or limit >= V1_UNLIMITED:
        return None
    return max(0, limit - usage) + cache


def _v2_room(d: Path, swap_free: int, swap: bool) -> int | None:
    room = _room(_read_int(d / "memory.max"), _read_int(d / "memory.current"), _stat(d).get("inactive_file", 0))
    if room is None or not swap:
        return room
    swap_room = _room(_read_int(d / "memory.swap.max"), _read_int(d / "memory.swap.current"), 0)
    return room + (swap_free if swap_room is None else min(swap_free, swap_room))  # ("max", or no swap controller)


def _v1_room(d: Path, swap_free: int, swap: bool) -> int | None:
    stat = _stat(d)
    cache = stat.get("total_inactive_file", 0)
    limit = _read_int(d / "memory.limit_in_bytes")
    hierarchical = stat.get("hierarchical_memory_limit", 0)  # an ancestor's the mount may not show
    if limit is not None and 0 < hierarchical < limit:
        limit = hierarchical  # (against this cgroup's usage: the ancestor's is not visible)
    room = _room(limit, _read_int(d / "memory.usage_in_bytes"), cache)
    if room is None or not swap:
        return room
    both = _room(_read_int(d / "memory.memsw.limit_in_bytes"), _read_int(d / "memory.memsw.usage_in_bytes"), cache)
    return room + swap_free if both is None else min(room + swap_free, both)  # memsw: memory and swap together


def cgroup_available(cgroup_text: str, root: Path = CGROUP_ROOT, swap_free: int = 0,
                     swap: bool = True) -> int | None:
    """Bytes the memory cgroups this process is in still allow, the tightest along its path (cgroup_text is
    /proc/self/cgroup's): limit less usage, plus the inactive page cache, which the kernel reclaims before it
    ends anything; with swap, plus what the cgroup may still swap (v2's memory.swap.max, v1's memsw limit on
    memory and swap together; else swap_free, the machine's). None where no cgroup on the path has a memory
    limit, or the files are not there. The memory controller's mount is taken to be /sys/fs/cgroup (v2) or
    /sys/fs/cgroup/memory (v1), where systemd, Docker and Kubernetes put it."""
    v1 = v2 = None
    for line in cgroup_text.splitlines():
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if "memory" in controllers.split(","):
            v1 = path
        elif hierarchy == "0" and controllers == "":
            v2 = path
    if v1 is not None and (root / "memory").is_dir():
        dirs, room = _dirs(root / "memory", v1), _v1_room
    elif v2 is not None:
        dirs, room = _dirs(root, v2), _v2_room
    else:
        return None
    rooms = [r for r in (room(d, swap_free, swap) for d in dirs) if r is not None]
    return min(rooms) if rooms else None


class _MemoryStatus(ctypes.Structure):  # Windows' MEMORYSTATUSEX
    _fields_ = [("dwLength", ctypes.c_uint32), ("dwMemoryLoad", ctypes.c_uint32)] + [
        (name, ctypes.c_uint64) for name in ("ullTotalPhys", "ullAvailPhys", "ullTotalPageFile", "ullAvailPageFile",
                                             "ullTotalVirtual", "ullAvailVirtual", "ullAvailExtendedVirtual")]


def windows_available(swap: bool = True) -> int | None:
    """Windows: GlobalMemoryStatusEx's available physical memory, or with swap what the commit limit (physical
    memory and page file) still allows; None where the call fails."""
    status = _MemoryStatus()
    status.dwLength = ctypes.sizeof(_MemoryStatus)
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
        return None
    return int(status.ullAvailPageFile if swap else status.ullAvailPhys)


def vm_stat_available(text: str) -> int | None:
    """macOS: the bytes of free, speculative and inactive pages in `vm_stat`'s text (psutil's available memory:
    inactive plus the kernel's free count, which vm_stat prints less the speculative pages); None without them.
    Swap, which macOS grows as it needs, and what its compressor could make room for are not counted."""
    size = re.search(r"page size of (\d+) bytes", text)
    pages = dict(re.findall(r"^Pages (free|speculative|inactive):\s+(\d+)\.?\s*$", text, re.M))
    if size is None or len(pages) < 3:
        return None
    return sum(int(n) for n in pages.values()) * int(size.group(1))


VM_STAT = "/usr/bin/vm_stat"


def macos_available() -> int | None:
    """vm_stat_available of `vm_stat`'s output; None where it does not run."""
    try:
        out = subprocess.run([VM_STAT], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return vm_stat_available(out.stdout) if out.returncode == 0 else None


def available_ram(swap: bool = True) -> int | None:
    """Bytes this process can still take (swap False: without swap, for page-locked memory): on Linux
    meminfo_available bounded by cgroup_available, on Windows windows_available, on macOS macos_available (no
    swap either way); None where not known."""
    if sys.platform == "win32":
        return windows_available(swap)
    if sys.platform == "darwin":
        return macos_available()
    try:
        meminfo = PROC_MEMINFO.read_text()
    except OSError:
        return None
    kib = _numbers(meminfo)
    have = _meminfo(kib, swap)
    try:
        cgroup_text = PROC_CGROUP.read_text()
    except OSError:
        return have
    limited = cgroup_available(cgroup_text, CGROUP_ROOT, kib.get("SwapFree", 0) * 1024, swap)
    return limited if have is None else have if limited is None else min(have, limited)

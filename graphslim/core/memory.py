"""How much memory this process may still take, so that inputs which would not fit (a data file
that expands to gigabytes, a model whose tensors do) are refused with one line before they are
read or run, instead of running the machine out of memory.

The bound is the smallest of: the memory the kernel reports available, the process limits
(``RLIMIT_AS``, ``RLIMIT_DATA``) less what the process already has, and the cgroup's limit less
its usage (containers).
"""

from __future__ import annotations

from pathlib import Path

try:
    import resource
except ImportError:  # not POSIX: no process limits to read
    resource = None  # type: ignore[assignment]

__all__ = ["available_bytes", "format_bytes"]


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 2**60:
            return None
        return max(0, int(limit) - usage)
    return None


def available_bytes() -> int | None:
    """Bytes this process can still allocate, at most; None where nothing can tell."""
    room = []
    for value in (_meminfo_available(), _cgroup_room()):
        if value is not None:
            room.append(value)
    limits = [] if resource is None else [(resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")]
    for limit, used in limits:
        soft = resource.getrlimit(limit)[0]
        have = _status_bytes(used)
        if soft != resource.RLIM_INFINITY and have is not None:
            room.append(max(0, soft - have))
    return min(room) if room else None


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"

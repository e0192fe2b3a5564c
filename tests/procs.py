"""Reading /proc: what the test fixtures use to find and wait for processes."""

from __future__ import annotations

from pathlib import Path


def cmdline(pid: int) -> str:
    """The process's command line, arguments joined by spaces ("" when it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie does not count)."""
    return not is_zombie_or_gone(pid)


def is_zombie_or_gone(pid: int) -> bool:
    """True once the process has exited (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def status_kib(pid: int, field: str) -> int:
    """A memory field of the process's /proc status, in KiB (``VmRSS``: resident now, ``VmHWM``: the peak)."""
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith(field + ":"):
            return int(row.split()[1])
    raise AssertionError(f"no {field} for process {pid}")

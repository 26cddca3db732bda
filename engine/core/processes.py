"""Is a process alive, and is it still the same process? The host name, a process's start time
(Linux ``/proc``, else psutil when installed) and a liveness test that treats zombies as dead:
what :func:`engine.core.paths.owner_gone` needs to tell a crashed owner from a live one (a reused pid
has another start time)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional


def this_host() -> str:
    return socket.gethostname()


def _proc_stat(pid: int) -> Optional[list[str]]:
    """The fields of /proc/PID/stat after the command name (field 3 onwards), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes().decode("utf-8", "replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces and parentheses.
    return raw[raw.rfind(")") + 2 :].split()


_BOOT_TIME: Optional[float] = None


def _boot_time() -> Optional[float]:
    global _BOOT_TIME
    if _BOOT_TIME is None:
        try:
            for line in Path("/proc/stat").read_text().splitlines():
                if line.startswith("btime "):
                    _BOOT_TIME = float(line.split()[1])
                    break
        except (OSError, ValueError):
            return None
    return _BOOT_TIME


def process_start_time(pid: int) -> Optional[float]:
    """When process ``pid`` started (seconds since the epoch, to about 10 ms), or None when it
    does not exist or its start time cannot be read. Linux: /proc/PID/stat field 22 (clock ticks
    since boot) plus the boot time; elsewhere psutil when it is installed."""
    if pid <= 0:
        return None
    fields = _proc_stat(pid)
    boot = _boot_time()
    if fields is not None and boot is not None and len(fields) > 19:
        try:
            return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
        except (ValueError, OSError):
            pass
    try:
        import psutil  # optional; not a requirement
    except ImportError:
        return None
    try:
        return float(psutil.Process(pid).create_time())
    except Exception:  # noqa: BLE001 - NoSuchProcess, AccessDenied, ...
        return None


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process here (a zombie, dead but not yet reaped, is not)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: ask psutil, else assume alive
        try:
            import psutil
        except ImportError:
            return True
        return bool(psutil.pid_exists(pid))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except (OSError, OverflowError, ValueError):
        return False
    fields = _proc_stat(pid)
    if fields and fields[0] in ("Z", "X"):
        return False
    return True

"""Honest wall-clock timing: warm-up, device sync, configurations interleaved round-robin, median and min, and
a contention flag (process CPU time / wall time), plus the machine and versions every result must carry."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_delta(fn: Callable[[], Any]) -> tuple[Any, int | None]:
    """Run ``fn`` and return ``(its result, peak resident memory above the level when it started, in bytes)``.

    Linux only (``None`` elsewhere): the kernel's resident high-water mark (``VmHWM``) is reset to the current RSS
    through ``/proc/self/clear_refs`` before the call and read after it, after glibc's ``malloc_trim`` returned
    freed heap pages (otherwise a later call reuses what an earlier one left resident and shows almost nothing).
    This is what the call needed beyond what the process held (weights included there), not its total footprint.
    """
    try:  # hand freed heap memory back to the OS first, so an earlier, larger run does not hide this one's
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    base = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        base = None
    out = fn()
    peak = _status_kib("VmHWM") if base is not None else None
    return out, (max(0, peak - base) * 1024 if peak is not None else None)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    """Versions, hardware and provenance to store beside every measurement."""
    import transformers

    import vlmprune

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vlmprune": vlmprune.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


Timed = Callable[[], Any] | tuple[Callable[[], Any], Callable[[], Any], Callable[[], Any]]


def _parts(entry: Timed) -> tuple[Callable[[], Any] | None, Callable[[], Any], Callable[[], Any] | None]:
    return entry if isinstance(entry, tuple) else (None, entry, None)


def interleaved(
    fns: dict[str, Timed], *, rounds: int = 7, warmup: int = 1, progress: bool = True
) -> dict[str, dict[str, Any]]:
    """Time each function ``rounds`` times, interleaving them round-robin so drift hits all alike.

    An entry is a callable, or ``(setup, fn, teardown)`` where only ``fn`` is timed (e.g. patch / prefill /
    unpatch, so that configurations of one model can be interleaved without timing the patching itself).

    Returns per name: ``median_s``, ``min_s``, ``times_s`` and ``cpu_per_wall`` (median process CPU time / wall
    time; on an otherwise idle box it is close to the thread count, much lower means contention).
    """
    names = list(fns)

    def call(n: str) -> tuple[float, float]:
        setup, fn, teardown = _parts(fns[n])
        if setup is not None:
            setup()
        try:
            sync()
            c0, t0 = time.process_time(), time.perf_counter()
            if torch.cuda.is_available():  # CUDA events: GPU time of the queued work, not the host's view of it
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                return start.elapsed_time(end) / 1000, time.process_time() - c0
            fn()
            sync()
            return time.perf_counter() - t0, time.process_time() - c0
        finally:
            if teardown is not None:
                teardown()

    for _ in range(warmup):
        for n in names:
            call(n)
    times: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    it = range(rounds)
    if progress:
        try:
            from tqdm import tqdm

            it = tqdm(it, desc="timing rounds", leave=False)
        except ImportError:
            pass
    for _ in it:
        for n in names:
            dt, cpu = call(n)
            times[n].append(dt)
            ratios[n].append(cpu / dt if dt > 0 else 0.0)
    return {
        n: {
            "median_s": statistics.median(times[n]),
            "min_s": min(times[n]),
            "times_s": times[n],
            "cpu_per_wall": statistics.median(ratios[n]),
        }
        for n in names
    }

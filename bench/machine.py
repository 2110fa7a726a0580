"""One line saying which machine a benchmark ran on, printed with its figures."""

from __future__ import annotations

import contextlib
import os
import platform


def machine_line() -> str:
    """CPU model, usable CPUs, OS, Python and the load average right now."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:  # not Linux: platform's
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{model}, {cpus} CPUs, {platform.system()} {platform.machine()},"
        f" Python {platform.python_version()}, load average {load}"
    )

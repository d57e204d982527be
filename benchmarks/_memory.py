"""Peak-memory probe shared by the benchmarks."""
from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB).

    VmHWM from /proc belongs to the process's own address space; ``ru_maxrss`` would not do for
    a probe started by a benchmark: Linux carries it over from the parent through fork and exec,
    so a child of a big parent starts with the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux

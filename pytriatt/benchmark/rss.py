"""Peak resident memory of this process (Linux: VmHWM, which can be reset; elsewhere ru_maxrss)."""

from __future__ import annotations

from typing import Optional

__all__ = ["rss_reset", "rss_peak"]


def rss_reset() -> bool:
    try:
        # "5": reset the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_peak() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

"""llama.cpp's log as the benchmark reads it: captured while a context is made (the KV allocation lines),
parsed into bytes per cache and per buffer."""

from __future__ import annotations

import ctypes
import os
import re
import sys

__all__ = ["KvLog", "parse_kv_log"]


class KvLog:
    """Captures llama.cpp's log (the KV cache allocation lines) while forwarding errors to stderr."""

    def __init__(self, lc):
        self.lc, self.text, self.last = lc, [], 0
        verbose = bool(os.environ.get("PYTRIATT_VERBOSE"))

        @lc.llama_log_callback
        def _cb(level, text, user_data):
            s = text.decode("utf-8", "replace")
            self.text.append(s)
            if level != 5:                  # 5 = CONT: continues the previous message
                self.last = level
            if verbose or self.last == 4:   # 4 = ERROR
                sys.stderr.write(s)

        self._cb = _cb
        lc.llama_log_set(_cb, ctypes.c_void_p(0))

    def take(self) -> str:
        s, self.text = "".join(self.text), []
        return s

    def close(self) -> None:
        from .. import context
        prev = getattr(context.quiet_logs, "cb", None)
        if prev is not None:
            self.lc.llama_log_set(prev, ctypes.c_void_p(0))


def parse_kv_log(text: str) -> dict:
    """KV allocation from llama.cpp's log: total bytes (the "size = X MiB" lines, 0.01 MiB resolution),
    cells per cache, and bytes per buffer (CPU, CUDA0, ...)."""
    caches = [dict(mib=float(m.group(1)), cells=int(m.group(2)), layers=int(m.group(3)))
              for m in re.finditer(r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells,\s*(\d+) layers", text)]
    bufs: dict = {}
    for m in re.finditer(r"llama_kv_cache:\s*(\S+) KV buffer size =\s*([\d.]+) MiB", text):
        bufs[m.group(1)] = bufs.get(m.group(1), 0) + round(float(m.group(2)) * 2**20)
    return {"bytes": round(sum(c["mib"] for c in caches) * 2**20) if caches else None,
            "resolution": 0.01 * 2**20 * max(1, len(caches)), "caches": caches, "buffers": bufs}

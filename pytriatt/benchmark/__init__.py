"""`pytriatt bench`: decode speed, scoring cost and KV memory of eviction policies against full attention.

    harness   the measurement (run_bench, run_parallel, parse_policies, ratios; see its docstring)
    kvmath    bytes per KV cell, llama.cpp's padding to 256 cells
    logs      llama.cpp's KV allocation log lines, captured and parsed
    rss       peak resident memory
    output    the report as text and as a plot
"""

from .harness import PolicyRun, PolicySpec, parse_policies, ratios, run_bench, run_parallel
from .kvmath import ModelShape, model_shape, pad256, row_bytes
from .logs import KvLog, parse_kv_log
from .output import format_report, plot_report
from .rss import rss_peak, rss_reset

__all__ = ["run_bench", "run_parallel", "parse_policies", "PolicySpec", "PolicyRun", "ratios", "ModelShape",
           "model_shape", "pad256", "row_bytes", "KvLog", "parse_kv_log", "format_report", "plot_report",
           "rss_peak", "rss_reset"]

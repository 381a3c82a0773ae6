"""How the commands print sizes and draw plots: the byte formatters and the one matplotlib guard."""

from __future__ import annotations

from typing import Optional

__all__ = ["PLOT_INSTALL_HINT", "mib", "mib_number", "decimal_size", "require_matplotlib"]

PLOT_INSTALL_HINT = "pip install 'pytriatt[plot]'"


def mib(n_bytes: float) -> str:
    """'12.3 MiB' (KV memory, as llama.cpp reports it)."""
    return f"{mib_number(n_bytes)} MiB"


def mib_number(n_bytes: Optional[float]) -> str:
    """'12.3' for a table column headed MiB; '-' where there is no value."""
    return "-" if n_bytes is None else f"{n_bytes / 2**20:.1f}"


def decimal_size(n_bytes: int, unit: Optional[str] = None) -> str:
    """A file size in decimal units as downloads and file managers give them: '8.7 GB', '512 B'; `unit`
    ("GB", "MB" or "kB") fixes the unit instead of choosing the largest that fits."""
    units = (("GB", 1e9), ("MB", 1e6), ("kB", 1e3))
    for name, div in units:
        if name == unit or (unit is None and n_bytes >= div):
            return f"{n_bytes / div:.1f} {name}"
    return f"{n_bytes} B"


def require_matplotlib():
    """matplotlib.pyplot on the file-only Agg backend; ImportError naming the install command without it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(f"plotting needs matplotlib: {PLOT_INSTALL_HINT}") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt

"""tools/fuzz_calib.py loaded as a module, for the tests that build GGUF variants with its encoder (rebuild,
calib_fields): one loader instead of one per test file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_path = Path(__file__).resolve().parent.parent / "tools" / "fuzz_calib.py"
_spec = importlib.util.spec_from_file_location("fuzz_calib", _path)
fz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fz)

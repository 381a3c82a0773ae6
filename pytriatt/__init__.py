"""pytriatt: TriAttention KV-cache compression for llama.cpp.

`import pytriatt` works with any llama-cpp-python (or none); what needs the
patched build raises pytriatt.PatchMissingError naming the command that fixes it.
"""

__version__ = "0.1.0"

from ._llama import PatchMissingError, patch_info, seq_positions, seq_rm_positions  # noqa: E402

# the scoring/selection API lives in pytriatt.core (it needs the compiled pytriatt._core);
# imported on first use so that `import pytriatt` stays light and never fails because of it
_CORE_NAMES = ("Calibration", "RopeSpec", "select", "select_heads", "model_fingerprint", "CalibrationError",
               "FingerprintMismatchError")


def __getattr__(name):
    if name in _CORE_NAMES:
        from . import core
        return getattr(core, name)
    raise AttributeError(f"module 'pytriatt' has no attribute {name!r}")


__all__ = ["__version__", "PatchMissingError", "patch_info", "seq_positions", "seq_rm_positions", *_CORE_NAMES]

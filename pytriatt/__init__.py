"""pytriatt: TriAttention KV-cache compression for llama.cpp.

`import pytriatt` works with any llama-cpp-python (or none); what needs the
patched build raises pytriatt.PatchMissingError naming the command that fixes it.
"""

__version__ = "0.1.0"

from ._llama import PatchMissingError, patch_info, seq_positions, seq_rm_positions  # noqa: E402

__all__ = ["__version__", "PatchMissingError", "patch_info", "seq_positions", "seq_rm_positions"]

"""The identity of the model a calibration belongs to (``triattention.model_fingerprint``)."""

from __future__ import annotations

import hashlib
from typing import List

from . import gguf_io
from .gguf_model import ModelMeta, model_shape, open_model

__all__ = ["model_fingerprint"]


def model_fingerprint(path_or_reader) -> str:
    """What identifies the model a calibration belongs to (``triattention.model_fingerprint``).

    ``"<arch>:<name>:<sha256 prefix>"``, the hash over the architecture, the attention and
    RoPE hyperparameters and the tokenizer's token list, and ``general.name``. It does not
    depend on the tensor data, so quantizations of one model share it (the statistics
    transfer); models of another shape, RoPE, vocabulary or name do not.
    """
    m = open_model(path_or_reader)
    shape = model_shape(m)
    arch = shape["arch"]
    name = str(m.scalar("general.name", "") or "")
    h = hashlib.sha256()
    parts = [
        f"arch={arch}", f"name={name}", f"n_layer={shape['n_layer']}", f"n_embd={shape['n_embd']}",
        f"head_dim={shape['head_dim']}", "heads=" + ",".join(map(str, shape["heads"])),
        "heads_kv=" + ",".join(map(str, shape["heads_kv"])),
    ]
    for k in ("rope.dimension_count", "rope.freq_base", "rope.freq_base_swa", "rope.scaling.type",
              "rope.scaling.factor", "attention.sliding_window", "context_length"):
        v = m.scalar(f"{arch}.{k}")
        if v is not None:
            parts.append(f"{k}={v}")
    h.update("\n".join(parts).encode())
    for token in _vocabulary(m):
        h.update(token)
        h.update(b"\0")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:48]
    return f"{arch}:{safe}:{h.hexdigest()[:24]}"


def _vocabulary(m: ModelMeta) -> List[bytes]:
    """The token list as stored (undecoded bytes: the hash must not depend on how invalid UTF-8 decodes)."""
    f = m.field("tokenizer.ggml.tokens")
    if f is None:
        return []
    if f.type == gguf_io.T_ARRAY and f.item_type == gguf_io.T_STRING:
        return m.string_bytes("tokenizer.ggml.tokens")
    return [repr(f.value).encode()]      # a malformed vocabulary: llama.cpp refuses the model anyway

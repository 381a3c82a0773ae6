"""The identity of the model a calibration belongs to (``triattention.model_fingerprint``)."""

from __future__ import annotations

import hashlib
from typing import List, Optional

from . import gguf_io
from .gguf_model import ModelMeta, model_shape, open_model

__all__ = ["model_fingerprint", "calibration_mismatch", "kv_to_str"]


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


# -- does a calibration belong to a model: the rule libllama applies when the policy attaches -----------
#
# One rule, written here and in cpp/llama-triatt-calib.cpp (triatt_check_same_model), and documented in
# docs/calibration-format.md ("Which model a calibration belongs to"): general.architecture and general.name
# must be equal; a calibration file that is a full copy of a model (it carries {arch}.block_count) must
# also carry every scalar {arch}.* value of the model, equal, and a vocabulary of the same size. Values
# compare as llama.cpp prints them (gguf_kv_to_str, cut at 1023 bytes), so both sides agree on what
# "equal" means (1e-7 apart floats print the same; so do two NaNs). tests/test_calibration_compat.py checks
# that Python and libllama accept and refuse the same files.

_META_BYTES = 1023        # llama_model_meta_val_str's buffer (1024) less the terminator


def _c_float(v: float) -> str:
    """std::to_string of a float or double: printf's %f, with glibc's spelling of NaN and infinity."""
    import math
    v = float(v)
    if math.isnan(v):
        return "-nan" if math.copysign(1.0, v) < 0 else "nan"
    if math.isinf(v):
        return "-inf" if v < 0 else "inf"
    return f"{v:f}"


def kv_to_str(kv: "gguf_io.KeyValue") -> str:
    """A metadata value printed as llama.cpp's gguf_kv_to_str prints it."""
    def one(t, v) -> str:
        if t == gguf_io.T_BOOL:
            return "true" if v else "false"
        if t in (gguf_io.T_FLOAT32, gguf_io.T_FLOAT64):
            return _c_float(v)
        if t == gguf_io.T_STRING:
            return v if isinstance(v, str) else bytes(v).decode("utf-8", "replace")
        return str(int(v))
    if kv.type != gguf_io.T_ARRAY:
        return one(kv.type, kv.value)
    items = []
    for v in kv.value:
        if kv.item_type == gguf_io.T_STRING:
            s = one(gguf_io.T_STRING, v).replace("\\", "\\\\").replace('"', '\\"')
            items.append(f'"{s}"')
        elif kv.item_type == gguf_io.T_ARRAY:
            items.append("???")
        else:
            items.append(one(kv.item_type, v))
    return "[" + ", ".join(items) + "]"


def _cut(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")[:_META_BYTES]


def _shown(s: str) -> str:
    """A value quoted for a message (its first 64 characters), or said to be unprintable: a corrupt file's
    bytes would break the line or the terminal."""
    return f"'{s[:64]}'" if gguf_io.printable(s) else "(unprintable bytes)"


def calibration_mismatch(calib, model) -> Optional[str]:
    """Why the statistics in `calib` do not belong to `model` (None: they do), by the rule above.
    Both are paths or ModelMeta."""
    c, m = open_model(calib), open_model(model)
    arch_f = m.field("general.architecture")
    arch = kv_to_str(arch_f) if arch_f is not None and arch_f.type != gguf_io.T_ARRAY else ""
    full_copy = c.field(f"{arch}.block_count") is not None
    for key, f in m.fields.items():
        if f.type == gguf_io.T_ARRAY:        # llama.cpp keeps no array in a model's metadata strings
            continue
        identity = key in ("general.architecture", "general.name")
        if not identity and not (full_copy and key.startswith(arch + ".")):
            continue
        theirs = c.field(key)
        theirs_s = kv_to_str(theirs) if theirs is not None else "(absent)"
        if _cut(theirs_s) != _cut(kv_to_str(f)):
            return (f"{c.path} holds statistics of another model ({key} {_shown(theirs_s)}, this model: "
                    f"{_shown(kv_to_str(f))}): calibrate this model")
    tokens = c.field("tokenizer.ggml.tokens")
    if full_copy and tokens is not None:
        mt = m.field("tokenizer.ggml.tokens")
        n_vocab = len(mt.value) if mt is not None and mt.type == gguf_io.T_ARRAY else 0
        if tokens.type != gguf_io.T_ARRAY or len(tokens.value) != n_vocab:
            return f"{c.path} holds statistics of a model with another vocabulary: calibrate this model"
    return None

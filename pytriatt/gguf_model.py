"""A GGUF model's metadata as the algorithm reads it: typed keys, per-layer values, the model's shape and
small F32 tensors (RoPE factors), from one parse of the header by pytriatt.gguf_io.

gguf_io bounds every length by the file size (gguf.GGUFReader trusts the file: an array claiming 2^60
elements made it loop for ever), so a hostile file costs nothing before it is refused. Every reader of
model metadata in the package (RoPE, fingerprint, calibration, info, eval) goes through :func:`open_model`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from . import gguf_io
from .errors import CalibrationError

__all__ = ["ModelMeta", "open_model", "model_shape", "MAX_LAYERS"]

# llama.cpp refuses more layers than this (LLAMA_MAX_LAYERS is 512); the bound keeps a hostile
# block count from making per-layer lists of billions of entries
MAX_LAYERS = 4096

_GGML_F32 = 0


class ModelMeta:
    """The parsed header of one GGUF file (gguf_io.GGUFHeader) with typed accessors.

    Lookups raise CalibrationError, naming the key, where a value has a type llama.cpp would refuse."""

    def __init__(self, header: "gguf_io.GGUFHeader"):
        self.header = header
        self.path: Path = header.path
        self.fields: Dict[str, gguf_io.KeyValue] = {kv.key: kv for kv in header.kv}
        self.tensors = header.tensors

    def field(self, key: str) -> Optional["gguf_io.KeyValue"]:
        return self.fields.get(key)

    def type_name(self, key: str) -> str:
        """How error messages name a key's type: "uint32", "array of float32", "array" when empty."""
        f = self.fields[key]
        name = gguf_io.type_name(f.type)
        if f.type == gguf_io.T_ARRAY and len(f.value):
            name += f" of {gguf_io.type_name(f.item_type)}"
        return name

    def scalar(self, key: str, default=None):
        f = self.field(key)
        if f is None:
            return default
        if f.type == gguf_io.T_ARRAY:
            raise CalibrationError(f"GGUF key {key} is an array, expected a scalar")
        return f.value

    def integer(self, key: str, default=None):
        """An integer hyperparameter: any GGUF integer type (llama.cpp refuses other types too)."""
        f = self.field(key)
        if f is None:
            return default
        if f.type not in gguf_io.INT_TYPES:
            raise CalibrationError(f"GGUF key {key} has type {self.type_name(key)}, expected an integer: "
                                   f"the file is malformed")
        return int(f.value)

    def array(self, key: str, dtype=None) -> Optional[np.ndarray]:
        """A numeric GGUF array as one numpy array."""
        f = self.field(key)
        if f is None:
            return None
        if f.type != gguf_io.T_ARRAY:
            raise CalibrationError(f"GGUF key {key} is a scalar, expected an array")
        if len(f.value) == 0:
            return np.zeros(0, dtype=dtype or np.float32)
        if f.item_type == gguf_io.T_STRING:
            raise CalibrationError(f"GGUF key {key} is an array of strings, expected numbers")
        if f.item_type == gguf_io.T_ARRAY:
            raise CalibrationError(f"GGUF key {key} is an array of arrays, expected numbers")
        return np.array(f.value, dtype=dtype or f.value.dtype)

    def per_layer_ints(self, key: str, n_layer: int, default) -> List[Any]:
        """A hyperparameter given once or per layer (head counts), as n_layer values."""
        f = self.field(key)
        if f is None:
            return [default] * n_layer
        if f.type == gguf_io.T_ARRAY:
            if not len(f.value) or f.item_type not in gguf_io.INT_TYPES:
                raise CalibrationError(f"GGUF key {key} has type {self.type_name(key)}, expected integers: "
                                       f"the file is malformed")
            a = self.array(key)
            if len(a) != n_layer:
                raise CalibrationError(f"GGUF key {key}: {len(a)} values for {n_layer} layers")
            return [int(v) for v in a]
        return [self.integer(key)] * n_layer

    def arch(self) -> str:
        arch = self.scalar("general.architecture")
        if not arch:
            raise CalibrationError("GGUF file has no general.architecture")
        if not gguf_io.printable(str(arch)):
            # every {arch}.* key a message names is built from it
            raise CalibrationError("general.architecture holds unprintable bytes: the file is malformed")
        return str(arch)

    def tensor_f32(self, name: str) -> Optional[np.ndarray]:
        """The data of a small F32 tensor (RoPE factors), flattened; None if the file has no such tensor."""
        for t in self.tensors:
            if t.name == name:
                if t.ggml_type != _GGML_F32:
                    raise NotImplementedError(f"tensor {name} has type {gguf_io.ggml_type_name(t.ggml_type)}, "
                                              f"expected F32")
                n = int(np.prod(t.shape, dtype=np.int64)) if t.shape else 1
                return np.fromfile(self.path, dtype="<f4", count=n,
                                   offset=self.header.data_offset + t.offset).astype(np.float32)
        return None

    def string_bytes(self, key: str) -> Optional[List[bytes]]:
        """A string array's elements as stored (bytes, not decoded): what hashes must see."""
        if self.field(key) is None:
            return None
        return gguf_io.read_string_array_bytes(self.header, key)


def open_model(path_or_model) -> ModelMeta:
    """The metadata of a GGUF file: a path, a ModelMeta (returned as is), a gguf_io.GGUFHeader, or a
    gguf.GGUFReader (accepted for compatibility: its file is parsed again by gguf_io)."""
    if isinstance(path_or_model, ModelMeta):
        return path_or_model
    if isinstance(path_or_model, gguf_io.GGUFHeader):
        return ModelMeta(path_or_model)
    data = getattr(path_or_model, "data", None)
    if getattr(data, "filename", None) is not None and hasattr(path_or_model, "fields"):
        path_or_model = data.filename      # a gguf.GGUFReader: its np.memmap knows the file
    path = os.fspath(path_or_model)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such GGUF file: {path}")
    try:
        return ModelMeta(gguf_io.read_header(path))
    except ValueError as e:
        raise CalibrationError(f"not a readable GGUF file: {e}") from None


def model_shape(m: ModelMeta) -> Dict[str, Any]:
    """arch, n_layer, n_embd, heads / heads_kv (per layer), head_dim: llama.cpp's reading of them."""
    arch = m.arch()
    n_layer = m.integer(f"{arch}.block_count")
    if n_layer is None:
        raise CalibrationError(f"GGUF file has no {arch}.block_count")
    if not 0 < n_layer <= MAX_LAYERS:
        raise CalibrationError(f"{arch}.block_count is {n_layer}, expected 1..{MAX_LAYERS}: the file is malformed")
    n_embd = m.integer(f"{arch}.embedding_length", 0)
    heads = m.per_layer_ints(f"{arch}.attention.head_count", n_layer, 0)
    heads_kv = m.per_layer_ints(f"{arch}.attention.head_count_kv", n_layer, None)
    heads_kv = [h if hk is None else hk for h, hk in zip(heads, heads_kv)]
    attn = [h for h in heads if h > 0]
    if not attn:
        raise NotImplementedError(f"architecture {arch!r}: no attention heads")
    n_head = attn[0]
    head_dim = m.integer(f"{arch}.attention.key_length", n_embd // n_head if n_embd else 0)
    return dict(arch=arch, n_layer=n_layer, n_embd=n_embd, heads=heads, heads_kv=heads_kv, head_dim=head_dim)

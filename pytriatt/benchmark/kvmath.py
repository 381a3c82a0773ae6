"""KV cache arithmetic of the benchmark: bytes per cell from the model's shape and the cache types, and
llama.cpp's padding of a context to 256 cells."""

from __future__ import annotations

from dataclasses import dataclass

from ..policy import KV_CACHE_TYPES

__all__ = ["row_bytes", "pad256", "ModelShape", "model_shape"]


def row_bytes(type_name: str, n: int) -> int:
    _, size, block = KV_CACHE_TYPES[type_name]
    if n % block:
        raise ValueError(f"a {type_name} cache row of {n} values is not a whole number of blocks of {block}")
    return n // block * size


def pad256(n: int) -> int:
    return (n + 255) // 256 * 256


@dataclass
class ModelShape:
    n_layer: int
    n_embd_k_gqa: int
    n_embd_v_gqa: int
    swa: bool          # sliding-window layers: a second cache of its own size, the formula does not apply

    def bytes_per_cell(self, type_k: str, type_v: str) -> int:
        return self.n_layer * (row_bytes(type_k, self.n_embd_k_gqa) + row_bytes(type_v, self.n_embd_v_gqa))


def model_shape(model) -> ModelShape:
    lc = model.lc
    arch = model.meta("general.architecture") or ""
    n_head = lc.llama_model_n_head(model.ptr)
    n_head_kv = lc.llama_model_n_head_kv(model.ptr)
    n_embd = lc.llama_model_n_embd(model.ptr)
    head_k = int(model.meta(f"{arch}.attention.key_length") or n_embd // n_head)
    head_v = int(model.meta(f"{arch}.attention.value_length") or head_k)
    swa = model.meta(f"{arch}.attention.sliding_window") is not None
    return ModelShape(lc.llama_model_n_layer(model.ptr), n_head_kv * head_k, n_head_kv * head_v, swa)

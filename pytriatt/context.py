"""A small, explicit wrapper over llama.cpp's C API (through llama_cpp's ctypes layer).

`llama_cpp.Llama` hides positions and sequences; eviction, calibration and the
tests need them: decode tokens at chosen positions of chosen sequences, read
logits, list and remove cached positions. That is all this module does.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from . import _llama
from .policy import (DEFAULT_BUDGET, DEFAULT_HORIZON, DEFAULT_INTERVAL, DEFAULT_SINK, DEFAULT_SNAP_WINDOW, DEFAULT_WINDOW,
                     EVICTING, KV_CACHE_TYPES, c_params, validate)

_backend_ready = False

# ggml_type values of the K/V cache types llama.cpp offers


def _llama_cpp():
    return _llama.require_patched()


def quiet_logs(lc) -> None:
    # llama.cpp logs every load to stderr; keep errors only unless PYTRIATT_VERBOSE is set
    if os.environ.get("PYTRIATT_VERBOSE"):
        return

    state = {"last": 0}

    @lc.llama_log_callback
    def _cb(level, text, user_data):
        # ggml_log_level: 4 = ERROR, 5 = CONT (continues the previous message)
        if level != 5:
            state["last"] = level
        if state["last"] == 4:
            import sys
            sys.stderr.write(text.decode("utf-8", "replace"))

    quiet_logs.cb = _cb  # keep the callback alive; the benchmark's log capture restores it
    lc.llama_log_set(_cb, ctypes.c_void_p(0))


class Model:
    """A GGUF model loaded through llama.cpp."""

    def __init__(self, path: str | os.PathLike, n_gpu_layers: Optional[int] = None):
        # default: $PYTRIATT_N_GPU_LAYERS, else 0 (CPU); lets the test suite run offloaded on a GPU machine
        if n_gpu_layers is None:
            n_gpu_layers = int(os.environ.get("PYTRIATT_N_GPU_LAYERS", "0"))
        global _backend_ready
        lc = _llama_cpp()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        if not _backend_ready:
            quiet_logs(lc)
            lc.llama_backend_init()
            _backend_ready = True
        params = lc.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        self.ptr = lc.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise ValueError(f"llama.cpp could not load {path} (not a GGUF model, truncated, or an "
                             f"unsupported architecture); run with PYTRIATT_VERBOSE=1 to see why")
        self.path = path
        self.vocab = lc.llama_model_get_vocab(self.ptr)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.lc = lc

    def meta(self, key: str) -> Optional[str]:
        buf = ctypes.create_string_buffer(1024)
        n = self.lc.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode() if n >= 0 else None

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        raw = text.encode()
        n_max = len(raw) + 16
        buf = (self.lc.llama_token * n_max)()
        n = self.lc.llama_tokenize(self.vocab, raw, len(raw), buf, n_max, add_bos, False)
        if n < 0:
            buf = (self.lc.llama_token * -n)()
            n = self.lc.llama_tokenize(self.vocab, raw, len(raw), buf, -n, add_bos, False)
        return list(buf[:n])

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self.lc.llama_model_free(self.ptr)
            self.ptr = None

    def __del__(self, _finalizing=sys.is_finalizing):
        # at interpreter exit llama_cpp's ctypes functions (and this module's globals) may be gone
        # already; the OS frees the memory. The default argument outlives the module's globals.
        if not _finalizing():
            self.close()


class Context:
    """A llama.cpp context: n_ctx KV cells shared by n_seq_max sequences."""

    def __init__(self, model: Model, n_ctx: int = 512, n_batch: int = 512, n_seq_max: int = 1,
                 n_threads: Optional[int] = None, cb_eval=None, cb_eval_user_data=None,
                 kv_unified: bool = True, type_k: Optional[str] = None, type_v: Optional[str] = None,
                 flash_attn: Optional[bool] = None, n_ctx_swa: Optional[int] = None):
        """flash_attn: None lets llama.cpp choose (auto); False also stores V transposed.
        n_ctx_swa: cells of a sliding-window model's local cache (default: llama.cpp's, from n_ctx); with a
        KV policy n_ctx is the budget, so pass pytriatt.policy.cells_needed_swa (evaluation.common.open_context
        does)."""
        lc = model.lc
        params = lc.llama_context_default_params()
        if n_ctx_swa is not None:
            params.swa_full = False
            params.n_ctx_swa = n_ctx_swa
        if flash_attn is not None:
            params.flash_attn_type = 1 if flash_attn else 0
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        params.kv_unified = kv_unified
        nt = n_threads or _llama.default_threads()
        params.n_threads = nt
        params.n_threads_batch = nt
        for name, t in (("type_k", type_k), ("type_v", type_v)):
            if t is not None:
                if t not in KV_CACHE_TYPES:
                    raise ValueError(f"{name} must be one of {', '.join(KV_CACHE_TYPES)}, got {t!r}")
                setattr(params, name, KV_CACHE_TYPES[t][0])
        if cb_eval is not None:
            params.cb_eval = cb_eval
            params.cb_eval_user_data = cb_eval_user_data
        self._cb_eval = cb_eval  # keep the ctypes callback alive
        self.ctx_ptr = lc.llama_init_from_model(model.ptr, params)
        if not self.ctx_ptr:
            quantized = [t for t in (type_k, type_v) if t and KV_CACHE_TYPES[t][2] > 1]
            if quantized:
                raise ValueError(f"llama.cpp could not create a context with a {quantized[0]} KV cache: a quantized "
                                 f"cache needs the model's head size to be a multiple of the type's block "
                                 f"({KV_CACHE_TYPES[quantized[0]][2]} values); use f16")
            raise ValueError(f"llama.cpp could not create a context with n_ctx={n_ctx}")
        self.model = model
        self.n_batch = n_batch
        self.n_ctx = lc.llama_n_ctx(self.ctx_ptr)
        self.memory = lc.llama_get_memory(self.ctx_ptr)
        self.lc = lc
        self.batch = lc.llama_batch_init(n_batch, 0, 1)

    def set_kv_policy(self, policy: str = "tri", budget: int = DEFAULT_BUDGET, *, interval: int = DEFAULT_INTERVAL,
                      sink: int = DEFAULT_SINK, window: int = DEFAULT_WINDOW, protect_prompt: bool = False,
                      kv_agg: str = "max", seed: int = 0,
                      calib: Optional[str | os.PathLike] = None, n_threads: int = 0, shift: bool = False,
                      snap_window: int = DEFAULT_SNAP_WINDOW, per_head: Union[bool, str] = False,
                      horizon: int = DEFAULT_HORIZON) -> None:
        """Attach an eviction policy (a name of pytriatt.policy.POLICIES) run inside llama_decode.

        tri needs `calib`: a GGUF carrying this model's statistics (default: the model file itself).
        window / horizon: -1 (default) for libllama's rules (pytriatt.policy.resolved_window/_horizon).
        shift: after each round move the kept tokens down to contiguous positions (decode() with
        pos0=None continues from the new end); default: they keep their positions.
        per_head (tri, snapkv): True or "head": every KV head keeps its own tokens (one set per KV head,
        shared by the layers); "layer": one set per KV head of each layer; False: one set for all."""
        lc = _llama.require_patched("kv policy")
        if policy not in EVICTING:
            validate(policy, None)   # an unknown name is refused; full attention takes no parameters
            p = lc.llama_kv_policy_default_params()
            p.type = lc.LLAMA_KV_POLICY_FULL
        else:
            p = c_params(lc, policy, budget, interval=interval, sink=sink, window=window,
                         protect_prompt=protect_prompt, per_head=per_head, shift=shift,
                         calib=calib if calib is not None else self.model.path, seed=seed,
                         n_threads=n_threads, kv_agg=kv_agg, snap_window=snap_window, horizon=horizon)
        if lc.llama_set_kv_policy(self.ctx_ptr, ctypes.byref(p)) != 0:
            raise ValueError(lc.llama_kv_policy_last_error().decode())

    def set_prompt(self, seq_id: int, n_prompt: int) -> None:
        """Declare the first n_prompt positions of seq_id its prompt (protected with protect_prompt=True);
        call it before decoding the prompt. Default: a sequence's first batch. ValueError when
        protect_prompt would keep more than the budget."""
        if self.lc.llama_kv_policy_set_prompt(self.ctx_ptr, seq_id, n_prompt) != 0:
            raise ValueError(self.lc.llama_kv_policy_last_error().decode("utf-8", "replace"))

    def kv_policy_stats(self, seq_id: int = 0) -> dict:
        st = self.lc.llama_get_kv_policy_stats(self.ctx_ptr, seq_id)
        return {k: getattr(st, k) for k, _ in st._fields_}

    def pos_max(self, seq_id: int = 0) -> int:
        return self.lc.llama_memory_seq_pos_max(self.memory, seq_id)

    def positions(self, seq_id: int = 0) -> np.ndarray:
        return _llama.seq_positions(self, seq_id)

    def head_positions(self, seq_id: int, layer: int, head_kv: int) -> np.ndarray:
        """The positions of the tokens KV head head_kv of layer `layer` holds for seq_id, ascending (with
        per-head eviction each head keeps its own; otherwise they are positions())."""
        lc = self.lc
        n = lc.llama_kv_policy_head_positions(self.ctx_ptr, seq_id, layer, head_kv, None, 0)
        if n < 0:
            raise ValueError(f"layer {layer} has no KV cache of its own, or KV head {head_kv} is out of range")
        buf = (lc.llama_pos * max(n, 1))()
        n = lc.llama_kv_policy_head_positions(self.ctx_ptr, seq_id, layer, head_kv, buf, n)
        return np.array(buf[:n], dtype=np.int32)

    def remove_positions(self, seq_id: int, positions) -> int:
        return _llama.seq_rm_positions(self, seq_id, positions)

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """llama_memory_seq_rm: remove seq_id's tokens with positions in [p0, p1) (-1: open end)."""
        return bool(self.lc.llama_memory_seq_rm(self.memory, seq_id, p0, p1))

    def clear(self) -> None:
        self.lc.llama_memory_clear(self.memory, True)

    def decode(self, tokens: Sequence[int], pos0: Optional[int] = None, seq_id: int = 0,
               logits: str = "last") -> Optional[np.ndarray]:
        """Decode tokens at positions pos0, pos0+1, ... (default: right after the sequence's newest,
        batch by batch, which follows a policy's shift).

        logits: "last" returns the last token's logits [n_vocab], "all" every token's
        [n, n_vocab], "none" nothing. Batches larger than n_batch are split."""
        lc = self.lc
        follow = pos0 is None
        n_vocab = self.model.n_vocab
        out = [] if logits == "all" else None
        last = None
        b = self.batch
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            final = start + len(chunk) == len(tokens)
            p0 = self.pos_max(seq_id) + 1 if follow else pos0 + start
            for i, tok in enumerate(chunk):
                b.token[i] = int(tok)
                b.pos[i] = p0 + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq_id
                b.logits[i] = logits == "all" or (logits == "last" and final and i == len(chunk) - 1)
            b.n_tokens = len(chunk)
            rc = lc.llama_decode(self.ctx_ptr, b)
            if rc != 0:
                raise RuntimeError(
                    f"llama_decode failed with {rc} at position {p0}"
                    + (" (no free KV cell: the context is full)" if rc == 1 else ""))
            if logits == "all":
                for i in range(len(chunk)):
                    p = lc.llama_get_logits_ith(self.ctx_ptr, i)
                    out.append(np.ctypeslib.as_array(p, shape=(n_vocab,)).copy())
            elif logits == "last" and final:
                p = lc.llama_get_logits_ith(self.ctx_ptr, len(chunk) - 1)
                last = np.ctypeslib.as_array(p, shape=(n_vocab,)).copy()
        if logits == "all":
            return np.stack(out) if out else np.zeros((0, n_vocab), np.float32)
        return last

    def close(self) -> None:
        if getattr(self, "ctx_ptr", None):
            self.lc.llama_batch_free(self.batch)
            self.lc.llama_free(self.ctx_ptr)
            self.ctx_ptr = None

    def __del__(self, _finalizing=sys.is_finalizing):
        # at interpreter exit llama_cpp's ctypes functions (and this module's globals) may be gone
        # already; the OS frees the memory. The default argument outlives the module's globals.
        if not _finalizing():
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

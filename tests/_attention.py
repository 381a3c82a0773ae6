"""Test helpers for attention exactness (tests/test_kv_per_head.py, tests/test_kv_swa.py): capture the
K, V, queries and attention output llama.cpp computes, and attend in NumPy to chosen token sets."""

from __future__ import annotations

import re

import numpy as np

from pytriatt.ggml_tensors import GgmlTensor, ggml_lib, read_tensor


class Capture:
    """An eval callback keeping, per layer, the post-RoPE K and the V of every decoded position, and the
    last decoded token's post-RoPE queries and attention output (kqv_out)."""

    def __init__(self):
        from pytriatt import _llama

        lc = _llama.require_patched()
        self.lib = ggml_lib()
        self.K, self.V, self.q, self.out = {}, {}, {}, {}
        self._v_pending = {}

        @lc.ggml_backend_sched_eval_callback
        def cb(ptr, ask, user_data):
            t = GgmlTensor.from_address(ptr)
            name = t.name.decode()
            m = re.fullmatch(r"(Kcur|Qcur|Vcur|kqv_out)-(\d+)", name)
            op = self.lib.ggml_op_desc(ptr)
            want = bool(m) and (op == b"ROPE" or name.startswith(("Vcur-", "kqv_out-")))
            if ask or not want:
                return want if ask else True
            il = int(m.group(2))
            x = read_tensor(self.lib, ptr)
            if name.startswith("Kcur-"):
                pos = read_tensor(self.lib, t.src[1]).ravel()
                for p, k in zip(pos.tolist(), x[0]):
                    self.K.setdefault(il, {})[int(p)] = k.astype(np.float32)
            elif name.startswith("Qcur-"):
                self.q[il] = x[0][-1].astype(np.float32)                  # [n_head, head_dim]
            elif name.startswith("Vcur-"):
                self._v_pending[il] = x                                   # rows of n_embd_v_gqa values
            else:
                self.out[il] = x.reshape(-1, x.shape[-1])[-1].astype(np.float32)
            return True

        self.cb = cb

    def decoded(self, p0, n):
        """Assign the V rows captured by the last decode to positions p0..p0+n-1."""
        for il, v in self._v_pending.items():
            v = v.reshape(n, -1)
            for i in range(n):
                self.V.setdefault(il, {})[p0 + i] = v[i].astype(np.float32)
        self._v_pending = {}


def reference_attention(cap, il, kept_by_head, n_head, n_head_kv, head_dim, scale=None, sinks=None):
    """NumPy attention of the last token's queries over, per KV head, the tokens it keeps. sinks: per query
    head, a logit that joins the softmax and adds no value (gpt-oss's attention sinks)."""
    q = cap.q[il]
    out = np.zeros((n_head, head_dim), np.float64)
    n_gqa = n_head // n_head_kv
    for h in range(n_head):
        g = h // n_gqa
        pos = kept_by_head[g]
        K = np.stack([cap.K[il][p][g] for p in pos]).astype(np.float64)
        V = np.stack([cap.V[il][p].reshape(n_head_kv, head_dim)[g] for p in pos]).astype(np.float64)
        s = K @ q[h].astype(np.float64) * (scale if scale is not None else 1.0 / np.sqrt(head_dim))
        m = s.max() if sinks is None else max(s.max(), float(sinks[h]))
        w = np.exp(s - m)
        total = w.sum() + (0.0 if sinks is None else np.exp(float(sinks[h]) - m))
        out[h] = (w / total) @ V
    return out.ravel()


def hadamard(n):
    """The orthonormal Sylvester-order Walsh-Hadamard matrix llama.cpp rotates quantized caches with."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)

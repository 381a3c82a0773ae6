#!/usr/bin/env python3
"""Coverage-guided fuzzing of every reader of TriAttention calibration metadata (atheris/libFuzzer).

Each input is a (small) GGUF file. It goes through:

1. ``pytriatt.gguf_io.read_header`` (the header parser of ``pytriatt calibrate/info/plot``);
2. ``pytriatt.core.Calibration.from_gguf`` (the calibration loader: the file as its own model,
   and the file's statistics against the real tiny model) and ``pytriatt.modelinfo.info_report``;
3. the C++ loader inside libllama: the file is attached with ``llama_set_kv_policy(tri,
   calib_path=...)`` to a context of a tiny llama model (``triatt_read_calib`` in
   cpp/llama-triatt-calib.cpp). When libllama accepts it, a few decode steps run eviction
   rounds with those statistics.

What counts as a bug (the fuzzer stops and saves the input): any Python exception other than a
``ValueError`` / ``NotImplementedError`` with a one-line message (a ``UnicodeDecodeError`` counts
as a bug: its message does not say what is wrong with the file), a loaded calibration with
non-finite or inconsistent numbers, a crash or sanitizer report in native code, a hang
(-timeout) or memory blow-up (-rss_limit_mb). Cases where libllama accepts statistics that
the Python loader rejects are not crashes; they are counted and the first few are saved to
``--disagree-dir`` for review.

The Python code of pytriatt and gguf is instrumented for coverage; libllama is not (its crashes
are still caught). A structure-aware mutator (rewrites one metadata value: type, array length,
NaN/inf/huge numbers, invalid UTF-8, duplicate or missing keys) alternates with libFuzzer's byte
mutations.

    python tools/fuzz_calib.py -max_total_time=60              # seeds generated into a temp dir
    python tools/fuzz_calib.py CORPUS_DIR -max_total_time=600   # keep the grown corpus
    python tools/fuzz_calib.py --replay tests/fuzz/regressions  # re-run saved inputs (no atheris needed)
    python tools/fuzz_calib.py --make-seeds DIR                 # just write the seed corpus

Options of this script (before the libFuzzer ones): --no-llama (Python readers only),
--disagree-dir DIR, --stats-file FILE, --make-seeds DIR, --replay PATH... Every other argument
goes to libFuzzer (-max_total_time, -runs, -seed, -artifact_prefix, -jobs, ...); libFuzzer's
last lines report the executions ("Done N runs") and the coverage ("cov: edges ft: features").
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CALIB_KEYS = ("version", "n_layer", "n_head", "n_freq", "q_mean_real", "q_mean_imag", "q_abs_mean",
              "calib_tokens", "calib_source", "model_fingerprint")

# the tiny model every input is attached to (pytriatt.testing.tiny defaults: 2 layers, 4 heads, 2 KV heads, head_dim 16)
TINY = dict(arch="llama", n_layer=2, n_embd=64, n_head=4, n_head_kv=2)


class Bug(AssertionError):
    """A reader misbehaved on an input (the fuzzer saves the input)."""


# ---------------------------------------------------------------------------
# GGUF assembly (header only: the calibration readers never need tensor data)
# ---------------------------------------------------------------------------


def assemble(kvs, tensor_part: bytes = b"", n_tensors: int = 0, version: int = 3) -> bytes:
    """A GGUF file from already-encoded key/value pairs (bytes) and the tensor infos + data after them."""
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, len(kvs)) + b"".join(kvs) + tensor_part


def rebuild(data: bytes, hdr, items) -> bytes:
    """data (a GGUF whose parsed header is hdr) with its metadata replaced by items
    ((key, vtype, item_type, value) tuples); tensor infos and data kept, the data re-aligned."""
    from pytriatt import gguf_io
    kvs = encode_all(items)
    head = b"GGUF" + struct.pack("<IQQ", hdr.version, len(hdr.tensors), len(kvs)) + b"".join(kvs) + \
        bytes(data[hdr.tensor_info_start:hdr.header_end])
    align = hdr.alignment
    for k, t, it, v in items:
        if k == "general.alignment" and t == gguf_io.T_UINT32 and v and not v & (v - 1):
            align = int(v)
    return head + bytes((-len(head)) % align) + bytes(data[hdr.data_offset:])


def model_keys(model_path) -> list:
    """(key, vtype, item_type, value) of a model's metadata, tokenizer left out (seeds stay small)."""
    from pytriatt import gguf_io
    hdr = gguf_io.read_header(model_path)
    return [(kv.key, kv.type, kv.item_type, kv.value) for kv in hdr.kv
            if not kv.key.startswith("tokenizer.") and not kv.key.startswith("triattention.")]


def encode_all(items) -> list:
    from pytriatt import gguf_io
    return [gguf_io.encode_value(k, v, t, it) for k, t, it, v in items]


def calib_fields(n_layer, n_head, n_freq, rng, *, tokens=4096, fingerprint=""):
    qr = rng.normal(size=(n_layer, n_head, n_freq)).astype(np.float32)
    qi = rng.normal(size=(n_layer, n_head, n_freq)).astype(np.float32)
    qa = (np.hypot(qr, qi) * (1 + rng.random(qr.shape))).astype(np.float32)
    return {
        "triattention.version": 1, "triattention.n_layer": n_layer, "triattention.n_head": n_head,
        "triattention.n_freq": n_freq, "triattention.q_mean_real": qr.ravel(),
        "triattention.q_mean_imag": qi.ravel(), "triattention.q_abs_mean": qa.ravel(),
        "triattention.calib_tokens": tokens, "triattention.calib_source": "fuzz seed",
        "triattention.model_fingerprint": fingerprint,
    }


def make_seeds(out_dir, model_path=None, real_calib=None) -> list:
    """Write the seed corpus: valid calibration headers for the tiny model (and variants)."""
    from pytriatt import gguf_io
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = model_keys(model_path) if model_path else [
        ("general.architecture", gguf_io.T_STRING, None, "llama"), ("general.name", gguf_io.T_STRING, None, "tiny"),
        ("llama.block_count", gguf_io.T_UINT32, None, 2), ("llama.embedding_length", gguf_io.T_UINT32, None, 64),
        ("llama.attention.head_count", gguf_io.T_UINT32, None, 4),
        ("llama.attention.head_count_kv", gguf_io.T_UINT32, None, 2),
        ("llama.context_length", gguf_io.T_UINT32, None, 4096),
        ("llama.rope.freq_base", gguf_io.T_FLOAT32, None, 10000.0)]
    written = []

    def write(name, items, fields, **kw):
        kvs = encode_all(items) + [gguf_io.encode_value(k, v) for k, v in fields.items()]
        p = out / f"seed-{name}.gguf"
        p.write_bytes(assemble(kvs, **kw))
        written.append(p)

    L, H, F = TINY["n_layer"], TINY["n_head"], TINY["n_embd"] // TINY["n_head"] // 2
    write("valid", base, calib_fields(L, H, F, rng))
    write("zeros", base, {**calib_fields(L, H, F, rng),
                          "triattention.q_mean_real": np.zeros(L * H * F, np.float32),
                          "triattention.q_mean_imag": np.zeros(L * H * F, np.float32),
                          "triattention.q_abs_mean": np.zeros(L * H * F, np.float32)})
    write("other-shape", base, calib_fields(L + 1, H, F, rng))
    write("no-calib", base, {})
    write("v2-gguf", base, calib_fields(L, H, F, rng), version=2)
    yarn = base + [("llama.rope.scaling.type", gguf_io.T_STRING, None, "yarn"),
                   ("llama.rope.scaling.factor", gguf_io.T_FLOAT32, None, 4.0),
                   ("llama.rope.scaling.original_context_length", gguf_io.T_UINT32, None, 1024)]
    write("yarn", yarn, calib_fields(L, H, F, rng))
    qwen = [(k.replace("llama.", "qwen2.", 1), t, it, v) for k, t, it, v in base]
    qwen = [(k, t, it, "qwen2" if k == "general.architecture" else v) for k, t, it, v in qwen]
    write("qwen2", qwen, calib_fields(L, H, F, rng))
    # a rope_freqs tensor (llama reads per-band factors from it): one F32 tensor of F values
    info = gguf_io._enc_string("rope_freqs.weight") + struct.pack("<I", 1) + struct.pack("<Q", F) + \
        struct.pack("<IQ", 0, 0)
    kvs = encode_all(base) + [gguf_io.encode_value(k, v) for k, v in calib_fields(L, H, F, rng).items()]
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, len(kvs)) + b"".join(kvs) + info
    pad = (-len(head)) % 32
    p = out / "seed-rope-freqs.gguf"
    p.write_bytes(head + bytes(pad) + np.linspace(1, 4, F, dtype=np.float32).tobytes())
    written.append(p)
    if real_calib:
        # a real calibration (pytriatt calibrate of the tiny model), metadata only
        hdr = gguf_io.read_header(real_calib)
        items = [(kv.key, kv.type, kv.item_type, kv.value) for kv in hdr.kv if not kv.key.startswith("tokenizer.")]
        p = out / "seed-real-calibrated.gguf"
        p.write_bytes(assemble(encode_all(items)))
        written.append(p)
    return written


# ---------------------------------------------------------------------------
# structure-aware mutation
# ---------------------------------------------------------------------------

_INTS = [0, 1, 2, 3, 4, 7, 8, 16, 31, 32, 64, 255, 1 << 16, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32,
         (1 << 63) - 1, -1, -2, -(1 << 31)]
_FLOATS = [0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e38, -1e38, 3.4e38, 1e-45, 1e-38, 65504.0]


def _rand_scalar(r: random.Random, old):
    from pytriatt import gguf_io as g
    t = r.choice([g.T_UINT32, g.T_INT32, g.T_UINT64, g.T_INT64, g.T_FLOAT32, g.T_FLOAT64, g.T_STRING, g.T_BOOL,
                  g.T_UINT8, g.T_INT16])
    if t == g.T_STRING:
        # control characters too: a message that quotes the value must not break its line or the terminal
        return t, None, r.choice(["", "llama", "tiny", "x" * r.randint(1, 300), "\udcff", "two\nlines", "\x1b[2J",
                                  "nul\x00"]) if r.random() < 0.8 \
            else bytes(r.randrange(256) for _ in range(r.randint(1, 8)))
    if t in (g.T_FLOAT32, g.T_FLOAT64):
        return t, None, r.choice(_FLOATS + [float(old) if isinstance(old, (int, float)) else 0.0])
    if t == g.T_BOOL:
        return t, None, r.random() < 0.5
    info = np.iinfo(g._NUMPY_OF[t])
    vals = [v for v in _INTS if info.min <= v <= info.max]
    if isinstance(old, (int, np.integer)) and not isinstance(old, bool):
        vals += [v for v in (int(old) - 1, int(old) + 1, int(old) * 2) if info.min <= v <= info.max]
    return t, None, r.choice(vals)


def _mutate_value(r: random.Random, kv):
    """New (vtype, item_type, value) for one key/value pair."""
    from pytriatt import gguf_io as g
    key, t, it, v = kv
    choice = r.random()
    if t == g.T_ARRAY and isinstance(v, np.ndarray) and choice < 0.7:
        a = v.copy()
        op = r.randrange(6)
        if op == 0 and a.size:                       # shorter
            a = a[: r.randrange(a.size)]
        elif op == 1:                                # longer
            a = np.concatenate([a, a[: r.randint(1, max(1, a.size))] if a.size else np.zeros(1, a.dtype)])
        elif op == 2 and a.size and a.dtype.kind == "f":   # poisoned elements
            for _ in range(r.randint(1, 3)):
                a[r.randrange(a.size)] = r.choice(_FLOATS)
        elif op == 3:                                # other element type
            nt = r.choice([g.T_FLOAT64, g.T_FLOAT32, g.T_INT32, g.T_UINT8, g.T_UINT32, g.T_BOOL, g.T_STRING])
            if nt == g.T_STRING:
                return g.T_ARRAY, nt, [str(x) for x in a[:8].tolist()]
            with np.errstate(all="ignore"):
                return g.T_ARRAY, nt, (np.nan_to_num(a.astype(np.float64)).astype(g._NUMPY_OF[nt])
                                       if nt != g.T_BOOL else a != 0)
        elif op == 4 and a.size and a.dtype.kind == "f":   # huge or negative magnitudes
            a = a * np.float32(r.choice([-1.0, 1e30, 1e-30, 3e38]))
        else:                                        # empty
            a = a[:0]
        return t, it, a
    if t == g.T_ARRAY and choice < 0.85:
        return _rand_scalar(r, None)
    if choice < 0.6 and t in g._NUMPY_OF:
        if g._NUMPY_OF[t].kind == "f":
            return t, it, r.choice(_FLOATS)
        info = np.iinfo(g._NUMPY_OF[t]) if t != g.T_BOOL else None
        if info is not None:
            vals = [x for x in _INTS if info.min <= x <= info.max]
            if isinstance(v, (int, np.integer)):
                vals += [x for x in (int(v) - 1, int(v) + 1) if info.min <= x <= info.max]
            return t, it, r.choice(vals)
    if choice < 0.8 and t != g.T_ARRAY:
        # a scalar becomes an array of it
        return g.T_ARRAY, g.T_UINT32 if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v < 1 << 32 \
            else g.T_FLOAT32, np.array([0 if isinstance(v, (str, bytes)) else v] * r.randint(0, 3))
    return _rand_scalar(r, v)


def structured_mutate(data: bytes, r: random.Random):
    """Rewrite one metadata pair of a parseable GGUF (None if data does not parse)."""
    from pytriatt import gguf_io as g
    path = _scratch_path("mut")
    path.write_bytes(data)
    try:
        hdr = g.read_header(path)
    except Exception:
        return None
    items = [(kv.key, kv.type, kv.item_type, kv.value) for kv in hdr.kv]
    if not items:
        return None
    i = r.randrange(len(items))
    # favour the calibration keys and the hyperparameters they are checked against
    hot = [j for j, it in enumerate(items) if it[0].startswith("triattention.") or ".block_count" in it[0]
           or "head_count" in it[0] or it[0] in ("general.architecture", "general.name")]
    if hot and r.random() < 0.8:
        i = r.choice(hot)
    op = r.random()
    if op < 0.08:
        del items[i]
    elif op < 0.14:
        items.insert(r.randrange(len(items) + 1), items[i])      # duplicate key
    elif op < 0.18:
        k = r.choice(CALIB_KEYS)
        items.append(("triattention." + k, *_rand_scalar(r, None)[:2], _rand_scalar(r, None)[2]))
    else:
        key, t, it, v = items[i]
        try:
            nt, nit, nv = _mutate_value(r, items[i])
        except (ValueError, OverflowError, TypeError):
            return None
        items[i] = (key, nt, nit, nv)
    try:
        return rebuild(data, hdr, items)
    except (ValueError, OverflowError, TypeError):
        return None


def byte_mutate(data: bytes, r: random.Random) -> bytes:
    """One byte-level change (libFuzzer's kinds, drawn from r): a flipped bit, an interesting byte or
    little-endian integer written over, a range erased, duplicated or cut off."""
    b = bytearray(data)
    if not b:
        return bytes(r.randrange(256) for _ in range(r.randint(1, 16)))
    i = r.randrange(len(b))
    op = r.randrange(6)
    if op == 0:
        b[i] ^= 1 << r.randrange(8)
    elif op == 1:
        b[i] = r.choice([0, 1, 0x7F, 0x80, 0xFF, r.randrange(256)])
    elif op == 2:
        v = r.choice(_INTS) % (1 << 64)
        w = r.choice([2, 4, 8])
        b[i:i + w] = (v % (1 << (8 * w))).to_bytes(w, "little")
    elif op == 3:
        del b[i:i + r.randint(1, 16)]
    elif op == 4:
        n = r.randint(1, 16)
        b[i:i] = b[i:i + n]
    else:
        del b[i:]
    return bytes(b)


def fixed_mutants(seeds, n: int, seed: int):
    """n inputs, the same on every machine: each is a seed (or an earlier mutant) changed 1-3 times,
    structurally (structured_mutate) or byte-wise, with random.Random(f"{seed}:{i}")."""
    pool = [Path(p).read_bytes() for p in sorted(seeds, key=lambda p: Path(p).name)]
    out = []
    for i in range(n):
        r = random.Random(f"{seed}:{i}")
        data = r.choice(out) if out and r.random() < 0.3 else r.choice(pool)
        for _ in range(r.randint(1, 3)):
            m = structured_mutate(data, r) if r.random() < 0.5 else None
            data = m if m is not None else byte_mutate(data, r)
        out.append(data[:65536])
    return out


# ---------------------------------------------------------------------------
# the target
# ---------------------------------------------------------------------------

_SCRATCH = None


def _own_tempdir(prefix: str, base=None) -> Path:
    """mkdtemp named after this process; removes the ones of processes that are gone (libFuzzer
    leaves through exit paths that skip atexit handlers)."""
    import shutil
    base = Path(base or tempfile.gettempdir())
    for d in base.glob(f"{prefix}*"):
        try:
            pid = int(d.name[len(prefix):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            pass
    d = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=base))
    atexit.register(shutil.rmtree, d, True)
    return d


def _scratch_path(name: str) -> Path:
    global _SCRATCH
    if _SCRATCH is None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        _SCRATCH = _own_tempdir("pytriatt-fuzz-", base)
    return _SCRATCH / f"{name}.gguf"


def _clean_error(e: BaseException, where: str) -> None:
    if isinstance(e, UnicodeDecodeError) or not isinstance(e, (ValueError, NotImplementedError)):
        raise Bug(f"{where}: {type(e).__name__}: {e}") from e
    msg = str(e)
    if not msg.strip() or "\n" in msg.strip():
        raise Bug(f"{where}: {type(e).__name__} with an unclear message: {msg!r}") from e


def _check_calibration(cal, where: str) -> None:
    for name in ("q_abs_mean",):
        a = np.asarray(getattr(cal, name))
        if not np.all(np.isfinite(a)):
            raise Bug(f"{where}: loaded a calibration with non-finite {name}")
    if not np.all(np.isfinite(cal.q_mean.real)) or not np.all(np.isfinite(cal.q_mean.imag)):
        raise Bug(f"{where}: loaded a calibration with non-finite q_mean")
    if cal.q_mean.shape != (cal.n_layer, cal.n_head, cal.n_freq) or cal.q_abs_mean.shape != cal.q_mean.shape:
        raise Bug(f"{where}: statistics shaped {cal.q_mean.shape} for {cal}")
    if np.any(cal.q_abs_mean < 0):
        raise Bug(f"{where}: loaded negative E|q_f| (q_abs_mean)")
    if np.any(np.abs(cal.q_mean.astype(np.complex128)) > cal.q_abs_mean.astype(np.float64) * 1.001 + 1e-30):
        raise Bug(f"{where}: loaded |E q_f| > E|q_f|: not statistics of one set of queries")


class Target:
    """Runs one input through every reader. Holds the tiny model and its context (made once)."""

    def __init__(self, use_llama: bool = True, disagree_dir=None, model_path=None, stats_file=None):
        import gguf
        self.stats_file = Path(stats_file) if stats_file else None
        self.model_path = Path(model_path) if model_path else None
        self.model_reader = gguf.GGUFReader(str(self.model_path)) if self.model_path else None
        self.ctx = None
        self.stats = {"execs": 0, "py_accepted": 0, "cpp_accepted": 0, "cpp_rounds": 0, "disagreements": 0}
        self.disagree_dir = Path(disagree_dir) if disagree_dir else None
        self._disagree_seen = set()
        if use_llama and self.model_path:
            try:
                from pytriatt import _llama
                lc = _llama.require_patched("kv policy")
            except Exception as e:  # no patched llama_cpp: Python readers only
                print(f"fuzz_calib: libllama not used ({e})", file=sys.stderr)
                return
            from pytriatt.context import Context, Model
            self.model = Model(self.model_path)
            # silence llama.cpp/ggml: every rejected file would print its reason to stderr
            import ctypes

            @lc.llama_log_callback
            def _quiet(level, text, user_data):
                return None

            self._log_cb = _quiet
            lc.llama_log_set(_quiet, ctypes.c_void_p(0))
            self.ctx = Context(self.model, n_ctx=64, n_batch=16, n_threads=1)
            self.tokens = self.model.tokenize("the quick brown fox jumps over the lazy dog " * 4)[:40]

    def __call__(self, data: bytes) -> None:
        self.stats["execs"] += 1
        if self.stats_file and self.stats["execs"] % 100 == 0:
            self.stats_file.write_text(json.dumps(self.stats) + "\n")
        path = _scratch_path("input")
        path.write_bytes(data)
        from pytriatt import core, gguf_io, modelinfo

        try:
            gguf_io.read_header(path)
        except Exception as e:
            _clean_error(e, "gguf_io.read_header")
        py_ok, self.py_error = False, ""
        try:
            cal = core.Calibration.from_gguf(path, strict=False)
            _check_calibration(cal, "Calibration.from_gguf(file)")
            py_ok = True
        except Bug:
            raise
        except Exception as e:
            _clean_error(e, "Calibration.from_gguf(file)")
            self.py_error = str(e)
        if self.model_reader is not None:
            try:
                # the same rule libllama applies at attach (docs/calibration-format.md): any disagreement
                # counted below is a difference between the two implementations of one rule
                cal = core.Calibration.from_gguf(path, self.model_reader)
                _check_calibration(cal, "Calibration.from_gguf(file, tiny model)")
                self.stats["py_accepted"] += 1
            except Bug:
                raise
            except Exception as e:
                _clean_error(e, "Calibration.from_gguf(file, tiny model)")
                py_ok, self.py_error = False, str(e)
        try:
            rep = modelinfo.info_report(path)
            json.dumps(rep, default=str)
        except Exception as e:
            _clean_error(e, "modelinfo.info_report")
        if self.ctx is not None:
            self._cpp(path, data, py_ok)

    def _cpp(self, path: Path, data: bytes, py_ok: bool) -> None:
        try:
            self.ctx.set_kv_policy("tri", budget=8, interval=8, window=1, calib=path, n_threads=1)
        except ValueError as e:
            if not str(e).strip():
                raise Bug("llama_set_kv_policy failed without a message") from e
            return
        self.stats["cpp_accepted"] += 1
        if not py_ok:
            self._disagree(data, "libllama accepted statistics the Python loader rejects: " + self.py_error)
        # run eviction rounds with these statistics: no crash, budget respected
        self.ctx.clear()
        try:
            self.ctx.decode(self.tokens[:16], pos0=0, logits="none")
            for i, tok in enumerate(self.tokens[16:]):
                self.ctx.decode([tok], logits="none")
                n = self.ctx.positions(0).size
                if n > 16:
                    raise Bug(f"{n} cached tokens with budget 8 + interval 8")
            self.stats["cpp_rounds"] += self.ctx.kv_policy_stats(0)["n_rounds"]
        finally:
            self.ctx.set_kv_policy("full")
            self.ctx.clear()

    def _disagree(self, data: bytes, why: str) -> None:
        self.stats["disagreements"] += 1
        if self.disagree_dir is None or len(self._disagree_seen) >= 20:
            return
        import hashlib
        h = hashlib.sha1(data).hexdigest()[:16]
        if h not in self._disagree_seen:
            self._disagree_seen.add(h)
            self.disagree_dir.mkdir(parents=True, exist_ok=True)
            (self.disagree_dir / f"disagree-{h}.gguf").write_bytes(data)
            (self.disagree_dir / f"disagree-{h}.txt").write_text(why + "\n")


def tiny_model(cache_dir=None) -> Path:
    """The tiny llama model the inputs are attached to (written once per cache dir)."""
    from pytriatt.testing.tiny import write_tiny_gguf
    import hashlib

    import pytriatt.testing.tiny
    d = Path(cache_dir or os.environ.get("PYTRIATT_CACHE", Path.home() / ".cache" / "pytriatt")) / "fuzz"
    d.mkdir(parents=True, exist_ok=True)
    # named after the writer's source: a changed pytriatt.testing.tiny writes a new model
    h = hashlib.sha256(Path(pytriatt.testing.tiny.__file__).read_bytes() + repr(TINY).encode()).hexdigest()[:12]
    p = d / f"tiny-llama-fuzz-{h}.gguf"
    if not p.exists():
        tmp = d / f".tiny-{os.getpid()}.gguf"
        write_tiny_gguf(tmp, **TINY)
        os.replace(tmp, p)
    return p


def real_calibrated(model: Path):
    """The tiny model through `pytriatt calibrate` (a real calibration), or None without libllama."""
    out = model.with_suffix(".tri.gguf")
    if out.exists():
        return out
    try:
        from pytriatt import gguf_io
        from pytriatt.calibrate import calibrate
        cal, _ = calibrate(model, max_tokens=256, n_ctx=128, progress=False)
        gguf_io.write_with_metadata(model, out, cal.gguf_fields(), force=True)
        return out
    except Exception as e:  # no patched llama_cpp
        print(f"fuzz_calib: no real calibration seed ({e})", file=sys.stderr)
        return None


def replay(paths, target: Target) -> int:
    """Run saved inputs through the target; returns the number that failed."""
    files = []
    for p in paths:
        p = Path(p)
        files += sorted(x for x in p.iterdir() if x.is_file() and not x.name.startswith(".")) if p.is_dir() else [p]
    bad = 0
    for f in files:
        try:
            target(f.read_bytes())
        except Bug as e:
            bad += 1
            print(f"FAIL {f}: {e}", file=sys.stderr)
    print(json.dumps({"replayed": len(files), "failed": bad, **target.stats}))
    return bad


def run_fixed(target: Target, n: int, seed: int, seeds_dir: Path, artifact_dir=None, run: bool = True) -> int:
    """Generate fixed_mutants from the deterministic seeds and run them; prints one JSON summary line
    (how many inputs, the sha256 of the set, failures, the target's counters); returns the failures."""
    import hashlib
    seeds = [p for p in make_seeds(seeds_dir, target.model_path) if p.name != "seed-real-calibrated.gguf"]
    inputs = fixed_mutants(seeds, n, seed)
    h = hashlib.sha256()
    for data in inputs:
        h.update(hashlib.sha256(data).digest())
    bad = 0
    for data in inputs if run else []:
        try:
            target(data)
        except Bug as e:
            bad += 1
            name = "crash-" + hashlib.sha1(data).hexdigest() + ".gguf"
            if artifact_dir:
                Path(artifact_dir).mkdir(parents=True, exist_ok=True)
                (Path(artifact_dir) / name).write_bytes(data)
            print(f"FAIL {name}: {e}", file=sys.stderr)
    print(json.dumps({"inputs": len(inputs), "seed": seed, "sha256": h.hexdigest(), "failed": bad, **target.stats}))
    return bad


def instrument_modules(atheris, prefixes) -> int:
    """Instrument (for coverage) every Python function of the loaded modules under prefixes.

    atheris.instrument_all() would take most of a minute (it instruments numpy too), and
    atheris.instrument_imports() misses an editable install's custom loader."""
    import inspect as pyinspect
    import types

    done = set()

    def visit(obj, depth=0):
        if isinstance(obj, types.FunctionType):
            if id(obj.__code__) not in done and obj.__module__ and obj.__module__.split(".")[0] in prefixes:
                atheris.instrument_func(obj)
                done.add(id(obj.__code__))
        elif isinstance(obj, type) and depth == 0:
            for v in vars(obj).values():
                if isinstance(v, (staticmethod, classmethod)):
                    v = v.__func__
                elif isinstance(v, property):
                    for f in (v.fget, v.fset):
                        if f is not None:
                            visit(f, 1)
                    continue
                visit(v, 1)

    for name, mod in list(sys.modules.items()):
        if mod is None or name.split(".")[0] not in prefixes:
            continue
        for v in list(vars(mod).values()):
            if pyinspect.isfunction(v) or pyinspect.isclass(v):
                if getattr(v, "__module__", "") == name:
                    visit(v)
    return len(done)


def main(argv=None) -> int:
    argv = list(sys.argv if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-llama", action="store_true", help="fuzz the Python readers only")
    ap.add_argument("--disagree-dir", help="save inputs libllama accepts but Python rejects here")
    ap.add_argument("--stats-file", help="write the target's counters here (JSON, every 100 inputs)")
    ap.add_argument("--make-seeds", metavar="DIR", help="write the seed corpus to DIR and exit")
    ap.add_argument("--replay", nargs="+", metavar="PATH", help="run saved inputs (files or directories) and exit")
    ap.add_argument("--fixed", type=int, metavar="N",
                    help="run N generated mutants, the same on every machine (no atheris needed), and exit")
    ap.add_argument("--fixed-seed", type=int, default=1, help="the seed of --fixed's mutants (default 1)")
    ap.add_argument("--fixed-hash-only", action="store_true", help="with --fixed: only print the set's size and hash")
    ap.add_argument("--artifact-dir", help="with --fixed: save failing inputs here")
    ap.add_argument("--structured", type=float, default=0.5,
                    help="share of mutations done by the structure-aware mutator (default 0.5)")
    args, fuzzer_args = ap.parse_known_args(argv[1:])

    model = tiny_model()
    if args.make_seeds:
        for p in make_seeds(args.make_seeds, model, None if args.no_llama else real_calibrated(model)):
            print(p)
        return 0
    target = Target(use_llama=not (args.no_llama or args.fixed_hash_only), disagree_dir=args.disagree_dir, model_path=model,
                    stats_file=args.stats_file)
    if args.replay:
        return 1 if replay(args.replay, target) else 0
    if args.fixed is not None:
        seeds_dir = _own_tempdir("pytriatt-fuzzseeds-")
        return 1 if run_fixed(target, args.fixed, args.fixed_seed, seeds_dir, args.artifact_dir,
                              run=not args.fixed_hash_only) else 0

    import atheris

    corpus_dirs = [a for a in fuzzer_args if not a.startswith("-")]
    flags = [a for a in fuzzer_args if a.startswith("-")]
    if not corpus_dirs:
        corpus_dirs = [str(_own_tempdir("pytriatt-fuzzcorpus-"))]
    seeds = Path(corpus_dirs[0])
    if not any(seeds.iterdir()):
        make_seeds(seeds, model, None if args.no_llama else real_calibrated(model))
    if not any(f.startswith("-max_len") for f in flags):
        flags.append("-max_len=65536")
    if not any(f.startswith("-timeout") for f in flags):
        flags.append("-timeout=20")
    if not any(f.startswith("-rss_limit_mb") for f in flags):
        flags.append("-rss_limit_mb=3072")
    if not any(f.startswith("-artifact_prefix") for f in flags):
        flags.append(f"-artifact_prefix={tempfile.gettempdir()}/pytriatt-fuzz-")

    def one_input(data: bytes) -> None:
        target(data)

    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        r = random.Random(seed)
        if r.random() < args.structured:
            out = structured_mutate(data, r)
            if out is not None and len(out) <= max_size:
                return out
        return atheris.Mutate(data, max_size)

    atheris.Setup([argv[0], *flags, *corpus_dirs], one_input, custom_mutator=mutator)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    if not any(a in sys.argv for a in ("--replay", "--make-seeds", "--fixed", "-h", "--help")):
        import atheris
        # coverage of pytriatt's and gguf's Python code: pytriatt may be installed in editable
        # mode (a custom import loader that atheris's import hook does not see through), so the
        # loaded functions are instrumented directly
        import gguf  # noqa: F401
        import gguf.gguf_reader  # noqa: F401
        from pytriatt import _llama, calibrate, context, core, gguf_io, modelinfo  # noqa: F401
        instrument_modules(atheris, ("pytriatt", "gguf"))
    sys.exit(main())

"""Specification of pytriatt.testing.tiny: tiny random-weight GGUF models that llama.cpp runs.

Every supported architecture must load in llama-cpp-python, decode 300 tokens
(a batched prefill, then one token at a time) with finite logits that depend on
the input, be deterministic for a seed, and (gemma3) get llama.cpp's iSWA
cache: local sliding-window layers next to global ones.
"""

import hashlib

import numpy as np
import pytest

from pytriatt.testing.tiny import ARCHS, tiny_vocab, write_tiny_gguf

llama_cpp = pytest.importorskip("llama_cpp")

N_CTX = 512
TEXT = (
    "The cache keeps every key and value of the attention layers. When the context is long, "
    "most of those tokens matter very little, so a good policy can drop them and keep the "
    "important ones. Unicode falls back to bytes: naïve café, 東京, ✓ 42."
)


def _load(path, **kw):
    kw.setdefault("n_ctx", N_CTX)
    kw.setdefault("n_batch", 256)
    kw.setdefault("n_threads", 1)
    kw.setdefault("n_threads_batch", 1)
    return llama_cpp.Llama(model_path=str(path), logits_all=True, verbose=False, **kw)


def _tokens(n, vocab_n, seed=1):
    rng = np.random.default_rng(seed)
    return [1] + rng.integers(3, vocab_n, size=n - 1).tolist()  # <s> then non-special ids


def _run(llm, tokens, n_prefill=200):
    """Batched prefill, then single-token decode steps; return logits for every position."""
    llm.reset()
    llm.eval(tokens[:n_prefill])
    for t in tokens[n_prefill:]:
        llm.eval([t])
    assert llm.n_tokens == len(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return {arch: write_tiny_gguf(d / f"{arch}.gguf", arch) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_and_decodes_300_tokens_with_finite_varying_logits(tiny_paths, arch):
    llm = _load(tiny_paths[arch])
    assert llm.metadata["general.architecture"] == arch
    assert llm.metadata["general.name"] == f"tiny-{arch}"
    toks = _tokens(300, llm.n_vocab())
    logits = _run(llm, toks)
    assert logits.shape == (300, llm.n_vocab())
    assert np.isfinite(logits).all()
    # logits depend on the input: positions differ and are not degenerate
    assert logits.std(axis=1).min() > 1e-3
    assert np.abs(logits[-1] - logits[-2]).max() > 1e-3
    # and on the earlier context, not only on the current token
    other = list(toks)
    other[5] = toks[5] + 1 if toks[5] + 1 < llm.n_vocab() else 3
    logits2 = _run(llm, other)
    assert np.abs(logits2[-1] - logits[-1]).max() > 1e-4
    # prefill in one batch and step-by-step decoding agree
    step = _run(llm, toks[:40], n_prefill=1)
    np.testing.assert_allclose(step, logits[:40], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_deterministic_for_a_seed(tmp_path, arch):
    a = write_tiny_gguf(tmp_path / "a.gguf", arch, seed=7)
    b = write_tiny_gguf(tmp_path / "b.gguf", arch, seed=7)
    c = write_tiny_gguf(tmp_path / "c.gguf", arch, seed=8)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)
    la, lc = _load(a), _load(c)
    toks = _tokens(32, la.n_vocab())
    ra, ra2, rc = _run(la, toks, 16), _run(la, toks, 16), _run(lc, toks, 16)
    np.testing.assert_array_equal(ra, ra2)
    assert np.abs(ra - rc).max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_one_layer_model(tmp_path, arch):
    llm = _load(write_tiny_gguf(tmp_path / "m.gguf", arch, n_layer=1))
    logits = _run(llm, _tokens(300, llm.n_vocab()))
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenize_detokenize_round_trip(tiny_paths, arch):
    llm = _load(tiny_paths[arch], n_ctx=64)
    toks = llm.tokenize(TEXT.encode(), add_bos=True)
    assert toks[0] == 1
    assert all(0 <= t < llm.n_vocab() for t in toks)
    assert len(toks) < len(TEXT.encode())  # word pieces are used, not only bytes
    assert llm.detokenize(toks[1:]).decode().strip() == TEXT


def test_gemma3_has_iswa_cache_with_local_and_global_layers(tiny_paths):
    llm = _load(tiny_paths["gemma3"])
    md = llm.metadata
    window = int(md["gemma3.attention.sliding_window"])
    assert window > 0
    assert "gemma3.attention.sliding_window_pattern" in md
    assert float(md["gemma3.rope.freq_base_swa"]) > 0
    assert llama_cpp.llama_model_n_swa(llm.model) == window
    for arch in ("llama", "qwen2", "qwen3"):
        assert llama_cpp.llama_model_n_swa(_load(tiny_paths[arch], n_ctx=64).model) == 0


def test_gemma3_sliding_window_changes_only_positions_past_the_window(tmp_path):
    """Same weights with and without SWA: identical until the window is exceeded."""
    w = 16
    swa = _load(write_tiny_gguf(tmp_path / "swa.gguf", "gemma3", sliding_window=w))
    full = _load(write_tiny_gguf(tmp_path / "full.gguf", "gemma3", sliding_window=0))
    assert llama_cpp.llama_model_n_swa(full.model) == 0
    toks = _tokens(120, swa.n_vocab())
    a, b = _run(swa, toks, 60), _run(full, toks, 60)
    np.testing.assert_allclose(a[: w - 1], b[: w - 1], rtol=1e-3, atol=1e-3)
    assert np.abs(a[w + 8 :] - b[w + 8 :]).max() > 1e-2


def test_gemma3_window_sized_swa_cache_matches_full_size(tmp_path):
    """swa_full=False (SWA cache sized to the window, cells recycled) gives the same logits."""
    p = write_tiny_gguf(tmp_path / "g.gguf", "gemma3", sliding_window=32)
    small, full = _load(p, swa_full=False), _load(p, swa_full=True)
    toks = _tokens(300, small.n_vocab())
    a, b = _run(small, toks, 100), _run(full, toks, 100)
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_other_weight_types(tmp_path, dtype):
    llm = _load(write_tiny_gguf(tmp_path / "m.gguf", "qwen3", dtype=dtype))
    assert np.isfinite(_run(llm, _tokens(64, llm.n_vocab()), 32)).all()


def test_shapes_vocab_size_and_head_dim(tmp_path):
    base = len(tiny_vocab()[0])
    llm = _load(
        write_tiny_gguf(tmp_path / "m.gguf", "qwen3", n_embd=96, n_head=6, n_head_kv=3,
                        head_dim=32, n_ff=160, vocab_size=base + 100, n_layer=3)
    )
    assert llm.n_vocab() == base + 100
    assert llm.metadata["qwen3.attention.key_length"] == "32"
    assert np.isfinite(_run(llm, _tokens(50, base), 25)).all()


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        write_tiny_gguf(tmp_path / "x.gguf", "mamba")
    with pytest.raises(ValueError, match="qwen2"):
        write_tiny_gguf(tmp_path / "x.gguf", "qwen2", head_dim=32)
    with pytest.raises(ValueError, match="vocab_size"):
        write_tiny_gguf(tmp_path / "x.gguf", vocab_size=10)
    with pytest.raises(TypeError, match="sliding_window"):
        write_tiny_gguf(tmp_path / "x.gguf", "llama", sliding_window=8)
    with pytest.raises(ValueError, match="dtype"):
        write_tiny_gguf(tmp_path / "x.gguf", dtype="q4_k")

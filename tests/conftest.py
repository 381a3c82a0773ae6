"""Shared fixtures: tiny random-weight models (written per session), calibrated copies of them, and real
models (fetched once). `tiny` / `tiny_cal` are the tiny llama and its calibrated copy; a test file that
means something else by `tiny` defines its own."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TINY_ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]

# settings a shell may have exported that change what the code under test prints or does: llama.cpp's
# LLAMA_ARG_* (its programs' flags), pytriatt's verbose log and forced code paths. PYTRIATT_N_GPU_LAYERS
# is kept: it is the documented way to run the suite offloaded on a GPU (README, tools/device_check.sh).
CLEARED_ENV = ("PYTRIATT_VERBOSE", "PYTRIATT_SCORE_BACKEND", "PYTRIATT_MOVE_STAGED", "PYTRIATT_MOVE_BACKEND")
CLEARED_ENV_PREFIXES = ("LLAMA_ARG_",)


@pytest.fixture(scope="session", autouse=True)
def no_settings_from_the_shell():
    """Every test runs as if none of CLEARED_ENV / LLAMA_ARG_* were set (a test that wants one sets it
    with monkeypatch). Session-wide, so servers started by module fixtures do not inherit them either."""
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name in CLEARED_ENV or name.startswith(CLEARED_ENV_PREFIXES):
                mp.delenv(name)
        yield


@pytest.fixture(scope="session", autouse=True)
def a_cache_of_the_sessions_own(tmp_path_factory):
    """$PYTRIATT_CACHE is a directory of this session's, so what earlier runs left in the user's cache
    (calibrations made on the fly by --calibrate, the fuzz target's models) cannot decide a test; it costs
    one on-the-fly calibration of smollm2-135m per session (~45 s on 2 cores). The downloaded models are
    shared: its models/ links to the user's (fetched once, checked by sha256)."""
    from pytriatt import models

    user_models = models.cache_dir() / "models"
    user_models.mkdir(parents=True, exist_ok=True)
    cache = tmp_path_factory.mktemp("pytriatt-cache")
    (cache / "models").symlink_to(user_models, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTRIATT_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """tiny_gguf(arch, **kw) -> path of a tiny random-weight GGUF (cached for the session)."""
    from pytriatt.testing.tiny import write_tiny_gguf

    made = {}

    def make(arch: str = "llama", **kw):
        key = (arch, tuple(sorted(kw.items())))
        if key not in made:
            d = tmp_path_factory.mktemp(f"tiny-{arch}")
            made[key] = write_tiny_gguf(d / f"tiny-{arch}.gguf", arch=arch, **kw)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny(tiny_gguf):
    """The tiny random-weight llama."""
    return tiny_gguf("llama")


@pytest.fixture(scope="session")
def tiny_calibrated(tiny_gguf, tmp_path_factory):
    """tiny_calibrated(arch) -> tiny_gguf(arch) with its TriAttention statistics embedded (what `pytriatt
    calibrate` writes, from max_tokens tokens read at n_ctx), cached for the session: tests only read it."""
    @functools.lru_cache(maxsize=None)
    def make(arch: str = "llama", *, max_tokens: int = 512, n_ctx: int = 256, **model_kw):
        from pytriatt import gguf_io
        from pytriatt.calibrate import calibrate

        src = tiny_gguf(arch, **model_kw)
        cal, _ = calibrate(src, max_tokens=max_tokens, n_ctx=n_ctx, progress=False)
        dst = tmp_path_factory.mktemp(f"cal-{arch}") / f"tiny-{arch}.tri.gguf"
        gguf_io.write_with_metadata(src, dst, cal.gguf_fields())
        return dst

    return make


@pytest.fixture(scope="session")
def tiny_cal(tiny_calibrated):
    """The tiny llama with its TriAttention statistics embedded (a `pytriatt calibrate` result)."""
    return tiny_calibrated("llama")


@pytest.fixture(scope="session")
def smollm2_path():
    from pytriatt import models
    return models.get("smollm2-135m")


@pytest.fixture(scope="session")
def llama_tools():
    """{name: path} of llama-server, llama-cli, ggml-rpc-server, built by tools/build_llama.py --tools (cached);
    PYTRIATT_LLAMA_TOOLS=DIR uses the programs in DIR instead."""
    given = os.environ.get("PYTRIATT_LLAMA_TOOLS")
    if given:
        paths = {name: Path(given) / name for name in ("llama-server", "llama-cli", "ggml-rpc-server")}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            pytest.skip(f"PYTRIATT_LLAMA_TOOLS={given} lacks {', '.join(missing)}")
        return paths
    if os.environ.get("PYTRIATT_TOOLS_BUILD") == "0":
        pytest.skip("llama.cpp's tools are not built: PYTRIATT_TOOLS_BUILD=0")
    if shutil.which("cmake") is None:
        pytest.skip("llama.cpp's tools cannot be built here: cmake is not on PATH")
    r = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "tools" / "build_llama.py"), "--tools"],
                       capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        pytest.fail("tools/build_llama.py --tools failed:\n" + "\n".join((r.stdout + r.stderr).splitlines()[-40:]))
    paths = [Path(line) for line in r.stdout.split()]
    return {p.name: p for p in paths}

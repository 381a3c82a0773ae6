"""Specification of tools/build_llama.py's safety checks: it builds only the pinned,
verified sources, and stops with a precise message when a patch does not apply."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_build_script():
    spec = importlib.util.spec_from_file_location("build_llama", REPO / "tools" / "build_llama.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bl = _load_build_script()


@pytest.fixture(scope="module")
def real_sdist():
    """The pinned sdist (downloaded by the build into the cache; fetched here if absent)."""
    return bl.fetch_sdist(bl.cache_root(), None)


def test_a_tampered_sdist_is_refused(tmp_path, monkeypatch, capsys, real_sdist):
    monkeypatch.setenv("PYTRIATT_BUILD_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / bl.SDIST_NAME
    data = bytearray(real_sdist.read_bytes()[:4096])
    data[100] ^= 0xFF
    fake.write_bytes(bytes(data))

    assert bl.main(["--sdist", str(fake), "--prepare-only"]) == 1
    err = capsys.readouterr().err
    assert "sha256" in err and bl.SDIST_SHA256 in err and "refusing" in err
    # nothing was unpacked from it
    assert not (tmp_path / "cache" / "pristine").exists()


@pytest.fixture(scope="module")
def scratch_cache(tmp_path_factory):
    """A build cache of the tests' own (unpacked once for the module), never the user's."""
    return tmp_path_factory.mktemp("build-cache")


def test_a_patch_that_does_not_apply_names_the_patch_and_the_hunk(tmp_path, monkeypatch, capsys, real_sdist):
    scratch_cache = tmp_path / "cache"    # its own: the module's cache may hold a work tree already
    monkeypatch.setenv("PYTRIATT_BUILD_CACHE", str(scratch_cache))
    patches = tmp_path / "patches"
    shutil.copytree(REPO / "patches", patches)
    bad = patches / "llama.cpp" / "9999-broken.patch"
    bad.write_text(
        "--- a/src/llama-batch.h\n"
        "+++ b/src/llama-batch.h\n"
        "@@ -1,3 +1,3 @@\n"
        " this line is not in llama-batch.h\n"
        "-nor is this one\n"
        "+replacement\n"
        " #pragma once\n")

    assert bl.main(["--sdist", str(real_sdist), "--patches", str(patches), "--prepare-only"]) == 1
    err = capsys.readouterr().err
    assert "llama.cpp/9999-broken.patch does not apply" in err
    assert "src/llama-batch.h: hunk #1 @@ -1,3 +1,3 @@ failed" in err
    # the failed attempt did not create or touch the work tree
    assert not (scratch_cache / "src").exists()


@pytest.mark.slow
def test_the_patches_apply_cleanly_and_stamp_the_version(monkeypatch, real_sdist, scratch_cache):
    monkeypatch.setenv("PYTRIATT_BUILD_CACHE", str(scratch_cache))
    assert bl.main(["--sdist", str(real_sdist), "--prepare-only"]) == 0
    work = scratch_cache / "src" / f"llama_cpp_python-{bl.VERSION}"
    assert "llama_memory_seq_rm_positions" in (work / "vendor/llama.cpp/include/llama.h").read_text()
    assert f'__version__ = "{bl.VERSION}+triatt.{bl.TRIATT_LEVEL}"' in (work / "llama_cpp/__init__.py").read_text()

    # a second run with unchanged patches rewrites nothing (keeps the CMake build incremental)
    header = work / "vendor/llama.cpp/include/llama.h"
    mtime = header.stat().st_mtime_ns
    assert bl.main(["--sdist", str(real_sdist), "--prepare-only"]) == 0
    assert header.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_tools_are_built_from_the_patched_tree_into_their_own_build_dir(monkeypatch, capsys, real_sdist,
                                                                        scratch_cache):
    monkeypatch.setenv("PYTRIATT_BUILD_CACHE", str(scratch_cache))
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    monkeypatch.setenv("CMAKE_BUILD_PARALLEL_LEVEL", "2")
    calls = []
    real_run = subprocess.run

    def fake_run(cmd, **kw):   # record CMake's steps; "build" the programs as empty files
        if cmd[0] != "cmake":
            return real_run(cmd, **kw)   # patch
        calls.append([str(c) for c in cmd])
        if "--build" in cmd:
            bindir = Path(cmd[cmd.index("--build") + 1]) / "bin"
            bindir.mkdir(parents=True, exist_ok=True)
            for name in bl.TOOLS:
                (bindir / name).write_text("")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bl.subprocess, "run", fake_run)
    assert bl.main(["--sdist", str(real_sdist), "--tools"]) == 0
    out = capsys.readouterr().out
    build_dir = scratch_cache / "build" / "tools-cpu"
    # stdout is the programs' paths, one a line
    assert out.split() == [str(build_dir / "bin" / name) for name in bl.TOOLS]
    configure, build = calls
    src = scratch_cache / "src" / f"llama_cpp_python-{bl.VERSION}" / "vendor" / "llama.cpp"
    assert configure[:5] == ["cmake", "-S", str(src), "-B", str(build_dir)]
    assert "-DLLAMA_BUILD_SERVER=ON" in configure and "-DGGML_RPC=ON" in configure
    assert f"-DLLAMA_TRIATT_DIR={REPO / 'cpp'}" in configure      # the core compiled into libllama
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in configure              # no download during the build
    assert build == ["cmake", "--build", str(build_dir), "--target", *bl.TOOLS, "-j", "2"]
    # and the sources it built carry the KV-policy arguments
    assert "--kv-policy" in (src / "common" / "arg.cpp").read_text()


def test_built_tools_are_linked_into_the_venvs_bin_so_a_bare_command_runs(tmp_path):
    bl = _load_build_script()
    built = tmp_path / "build" / "bin"
    built.mkdir(parents=True)
    paths = []
    for name in ("llama-server", "llama-cli"):
        (built / name).write_text("#!/bin/sh\necho " + name + "\n")
        (built / name).chmod(0o755)
        paths.append(built / name)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    assert bl.venv_bin(str(venv / "bin" / "python")) == venv / "bin"
    assert bl.venv_bin(str(tmp_path / "python")) is None           # not a venv: nothing is linked
    (venv / "bin" / "llama-cli").write_text("a program of the user's own")
    linked = bl.link_tools(paths, venv / "bin")
    assert linked == [venv / "bin" / "llama-server"]               # the user's file is left alone
    assert (venv / "bin" / "llama-cli").read_text() == "a program of the user's own"
    assert subprocess.run([str(venv / "bin" / "llama-server")], capture_output=True, text=True).stdout == "llama-server\n"
    # a second build replaces its own link
    assert bl.link_tools(paths, venv / "bin") == linked and (venv / "bin" / "llama-server").resolve() == paths[0]

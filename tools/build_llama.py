#!/usr/bin/env python3
"""Build and install the patched llama-cpp-python (with its vendored llama.cpp).

What it does, in order:
  1. gets the pinned llama-cpp-python sdist by package name (pip download, no
     binary) into the cache, and refuses it unless its sha256 is the pinned one;
  2. unpacks it once into <cache>/pristine (never modified afterwards);
  3. lays the patched sources into <cache>/src: patches/llama.cpp/*.patch are
     applied to vendor/llama.cpp and patches/llama-cpp-python/*.patch to the
     package, in name order; only files whose content changes are rewritten, so
     the CMake build directory stays valid and rebuilds are incremental;
  4. stamps the version 0.3.36+triatt.<TRIATT_LEVEL> and a manifest of the
     applied patches (llama_cpp/_triatt.json, read by `pytriatt doctor`);
  5. pip-installs it into the running Python, keeping the CMake build directory
     in <cache>/build/<key> (the key changes with CMAKE_ARGS, so a CPU and a
     CUDA build do not overwrite each other).

The cache is $PYTRIATT_BUILD_CACHE, or ~/.cache/pytriatt/llama-build.
CMAKE_ARGS passes through to CMake (default: a CPU build). For NVIDIA GPUs:
    CMAKE_ARGS="-DGGML_CUDA=ON" python tools/build_llama.py

With --tools it builds llama.cpp's own programs from the same patched tree
instead of the Python package: llama-server, llama-cli and ggml-rpc-server, in
<cache>/build/tools-<key> (CMake, incremental), links them into the bin/ of the venv
of --python (so the activated venv runs a bare `llama-server`), and prints their paths.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# bump when the patch set changes in a way users should see in the version
TRIATT_LEVEL = 14

REPO = Path(__file__).resolve().parent.parent
PATCH_DIRS = {
    # patch directory -> directory of the sdist the patches apply to (with -p1)
    "llama.cpp": "vendor/llama.cpp",
    "llama-cpp-python": ".",
}
# CMake options we add to whatever the user passes in CMAKE_ARGS: no multimodal library (unused,
# and it doubles the build time), and the TriAttention core compiled into libllama from cpp/
DEFAULT_CMAKE_ARGS = ["-DLLAVA_BUILD=OFF", f"-DLLAMA_TRIATT_DIR={REPO / 'cpp'}"]


# llama.cpp's own programs built by --tools, and the CMake options of that build: no tests, examples, web
# UI download or OpenSSL (the server only listens), the RPC backend on (ggml-rpc-server)
TOOLS = ["llama-server", "llama-cli", "ggml-rpc-server"]
TOOLS_CMAKE_ARGS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
                    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_RPC=ON"]


class BuildError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[build_llama] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    env = os.environ.get("PYTRIATT_BUILD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pytriatt" / "llama-build"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- 1. the sdist -------------------------------------------------------------

def fetch_sdist(cache: Path, sdist: Path | None) -> Path:
    """Return a verified sdist: the given file, the cached one, or a fresh download."""
    if sdist is None:
        sdist = cache / "dl" / SDIST_NAME
        if not sdist.exists():
            sdist.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=sdist.parent) as tmp:
                log(f"downloading {PACKAGE}=={VERSION} (sdist, ~76 MB)")
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                       "-d", tmp, f"{PACKAGE}=={VERSION}"]
                r = subprocess.run(cmd, capture_output=True, text=True)
                got = Path(tmp) / SDIST_NAME
                if r.returncode != 0 or not got.exists():
                    tail = (r.stdout + r.stderr).strip().splitlines()[-15:]
                    raise BuildError(f"pip could not download {PACKAGE}=={VERSION}:\n  " + "\n  ".join(tail))
                os.replace(got, sdist)
    if not sdist.is_file():
        raise BuildError(f"sdist not found: {sdist}")
    digest = sha256_of(sdist)
    if digest != SDIST_SHA256:
        raise BuildError(
            f"refusing {sdist}: its sha256 is {digest}, expected {SDIST_SHA256} "
            f"({PACKAGE} {VERSION} as pinned). The file was altered or is another release; "
            f"delete it and run again to download it afresh.")
    return sdist


# -- 2. the pristine tree -----------------------------------------------------

def unpack_pristine(cache: Path, sdist: Path) -> Path:
    root = cache / "pristine"
    tree = root / f"llama_cpp_python-{VERSION}"
    stamp = root / ".complete"
    if stamp.exists() and stamp.read_text() == SDIST_SHA256 and tree.is_dir():
        return tree
    log(f"unpacking {sdist.name}")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    with tarfile.open(sdist) as tf:
        tf.extractall(root, filter="data")
    if not tree.is_dir():
        raise BuildError(f"{sdist.name} does not contain llama_cpp_python-{VERSION}/")
    stamp.write_text(SDIST_SHA256)
    return tree


# -- 3. patched work tree ------------------------------------------------------

def list_patches(patch_root: Path) -> list[tuple[Path, str]]:
    """(patch file, target dir relative to the sdist root), in the order they apply."""
    out = []
    for sub, target in PATCH_DIRS.items():
        d = patch_root / sub
        if d.is_dir():
            out += [(p, target) for p in sorted(d.glob("*.patch"))]
    return out


_FILE_RE = re.compile(r"^\+\+\+ (?:b/)?(\S+)", re.M)


def patched_files(patch: Path) -> list[str]:
    return [m for m in _FILE_RE.findall(patch.read_text()) if m != "/dev/null"]


def hunk_header(patch: Path, file: str, n: int) -> str:
    """The '@@ ... @@' line of hunk n (1-based) of `file` in the patch, for error messages."""
    text = patch.read_text().splitlines()
    in_file, k = False, 0
    for line in text:
        if line.startswith("+++ "):
            in_file = line[4:].split()[0].removeprefix("b/") == file
        elif in_file and line.startswith("@@"):
            k += 1
            if k == n:
                return line
    return "?"


def apply_patch(patch: Path, target: Path) -> None:
    r = subprocess.run(["patch", "-p1", "--forward", "--batch", "--no-backup-if-mismatch",
                        "-r", "-", "-i", str(patch)], cwd=target, capture_output=True, text=True)
    if r.returncode == 0:
        return
    out = r.stdout + r.stderr
    problems, current = [], "?"
    for line in out.splitlines():
        m = re.match(r"patching file (\S+)", line)
        if m:
            current = m.group(1)
        m = re.match(r"Hunk #(\d+) FAILED at (\d+)", line)
        if m:
            n = int(m.group(1))
            problems.append(f"{current}: hunk #{n} {hunk_header(patch, current, n)} failed (near line {m.group(2)})")
        if "can't find file" in line or "No file to patch" in line:
            problems.append(line.strip())
    detail = "\n  ".join(problems) if problems else out.strip()
    raise BuildError(f"patch {patch.relative_to(patch.parents[1])} does not apply to "
                     f"{PACKAGE} {VERSION}:\n  {detail}\n"
                     f"Rebase the patch on the pinned sources ({PACKAGE} {VERSION}).")


def sync_tree(pristine: Path, work: Path, patch_root: Path) -> list[dict]:
    """Make `work` equal pristine + patches, touching only files whose content differs."""
    patches = list_patches(patch_root)
    state_file = work.parent / ".patched-files.json"
    fresh = not work.is_dir()
    previous = json.loads(state_file.read_text()) if state_file.exists() and not fresh else []

    # every file a patch touches, now or in the previous build, relative to the sdist root
    current = sorted({str(Path(t) / f) for p, t in patches for f in patched_files(p)})
    touched = sorted(set(current) | set(previous))

    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        for rel in touched:
            src = pristine / rel
            if src.exists():
                (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, stage / rel)
        manifest = []
        for patch, target in patches:
            (stage / target).mkdir(parents=True, exist_ok=True)
            apply_patch(patch, stage / target)
            manifest.append({"name": f"{patch.parent.name}/{patch.name}", "sha256": sha256_of(patch)})
        # every patch applied: only now touch the work tree
        if fresh:
            log("creating the work tree")
            shutil.copytree(pristine, work, symlinks=True)
        changed = 0
        for rel in touched:
            new, dst = stage / rel, work / rel
            if new.exists():
                if not dst.exists() or new.read_bytes() != dst.read_bytes():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(new, dst)
                    changed += 1
            elif dst.exists():
                dst.unlink()  # created by a patch that is gone now
                changed += 1
    state_file.write_text(json.dumps(current))
    log(f"{len(patches)} patches applied, {changed} source files changed since the last build")
    return manifest


def write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def stamp_version(work: Path, manifest: list[dict], cmake_args: list[str]) -> str:
    version = f"{VERSION}+triatt.{TRIATT_LEVEL}"
    init = work / "llama_cpp" / "__init__.py"
    text = re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"', init.read_text())
    write_if_changed(init, text)
    info = {"version": version, "sdist_sha256": SDIST_SHA256, "patches": manifest, "cmake_args": cmake_args}
    write_if_changed(work / "llama_cpp" / "_triatt.json", json.dumps(info, indent=1) + "\n")
    return version


# -- 5. build -------------------------------------------------------------------

def build(work: Path, build_dir: Path, cmake_args: list[str], python: str) -> None:
    if subprocess.run([python, "-c", "import scikit_build_core"], capture_output=True).returncode != 0:
        log("installing scikit-build-core (build backend of llama-cpp-python)")
        subprocess.run([python, "-m", "pip", "install", "-q", "scikit-build-core>=0.9.2"], check=True)
    env = dict(os.environ, CMAKE_ARGS=" ".join(cmake_args))
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    cmd = [python, "-m", "pip", "install", "--no-build-isolation", "--force-reinstall", "--no-deps",
           "-C", f"build-dir={build_dir}", str(work)]
    log(f"building in {build_dir} (CMAKE_ARGS={env['CMAKE_ARGS']!r}); a first build takes minutes")
    r = subprocess.run(cmd, env=env)
    if r.returncode != 0:
        raise BuildError(f"the build failed (exit {r.returncode}); see the compiler output above")
    # runtime dependencies of llama-cpp-python, without touching what is installed
    subprocess.run([python, "-m", "pip", "install", "-q", "numpy>=1.20.0", "typing-extensions>=4.5.0",
                    "diskcache>=5.6.1", "jinja2>=2.11.3"], check=True)


def tools_dir(cache: Path, key: str) -> Path:
    """Where --tools puts llama.cpp's programs (bin/ of its CMake build directory)."""
    return cache / "build" / f"tools-{key}" / "bin"


def build_tools(work: Path, build_dir: Path, cmake_args: list[str]) -> list[Path]:
    """Configure and build llama.cpp's own programs from the patched tree; return their paths."""
    if shutil.which("cmake") is None:
        raise BuildError("--tools needs cmake on PATH (https://cmake.org, or: pip install cmake)")
    src = work / "vendor" / "llama.cpp"
    jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 2)
    steps = [["cmake", "-S", str(src), "-B", str(build_dir), *TOOLS_CMAKE_ARGS,
              *[a for a in cmake_args if not a.startswith("-DLLAVA_BUILD")]],
             ["cmake", "--build", str(build_dir), "--target", *TOOLS, "-j", jobs]]
    log(f"building {', '.join(TOOLS)} in {build_dir} ({jobs} jobs); a first build takes minutes")
    for cmd in steps:
        r = subprocess.run(cmd, stdout=sys.stderr)   # stdout: only the paths printed at the end
        if r.returncode != 0:
            raise BuildError(f"{' '.join(cmd[:2])} failed (exit {r.returncode}); see the output above")
    paths = [build_dir / "bin" / name for name in TOOLS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise BuildError(f"the build finished without {', '.join(missing)}")
    return paths


def venv_bin(python: str) -> Path | None:
    """The bin/ of the virtual environment `python` belongs to (None for a Python outside one)."""
    d = Path(python).absolute().parent
    return d if (d.parent / "pyvenv.cfg").is_file() else None


def link_tools(paths: list[Path], bin_dir: Path) -> list[Path]:
    """Symlink the built programs into bin_dir (a venv's bin/), replacing earlier links to them, so the
    README's bare `llama-server` runs in the activated venv; a file that is not a link is left alone."""
    out = []
    for p in paths:
        dst = bin_dir / p.name
        if dst.is_symlink():
            dst.unlink()
        elif dst.exists():
            log(f"{dst} exists and is not a link made here: left as it is")
            continue
        dst.symlink_to(p)
        out.append(dst)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist", type=Path, help="use this sdist file instead of downloading it (still verified)")
    ap.add_argument("--patches", type=Path, default=REPO / "patches", help="patch directory (default: patches/)")
    ap.add_argument("--prepare-only", action="store_true", help="verify, unpack and patch; do not build")
    ap.add_argument("--python", default=sys.executable, help="Python to install into (default: this one)")
    ap.add_argument("--tools", action="store_true",
                    help=f"build llama.cpp's own {', '.join(TOOLS)} from the patched tree instead of the Python "
                         f"package (into <cache>/build/tools-<key>/bin, linked into the bin/ of --python's venv; "
                         f"prints their paths)")
    args = ap.parse_args(argv)

    t0 = time.time()
    cache = cache_root()
    cmake_args = DEFAULT_CMAKE_ARGS + os.environ.get("CMAKE_ARGS", "").split()
    # one build at a time per cache: a second one waits (the work tree and build dir are shared)
    cache.mkdir(parents=True, exist_ok=True)
    lock = open(cache / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another build holds {cache}; waiting for it")
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        sdist = fetch_sdist(cache, args.sdist)
        pristine = unpack_pristine(cache, sdist)
        work = cache / "src" / pristine.name
        manifest = sync_tree(pristine, work, args.patches)
        version = stamp_version(work, manifest, cmake_args)
        if args.prepare_only:
            log(f"prepared {work} ({version})")
            return 0
        user_args = cmake_args[len(DEFAULT_CMAKE_ARGS):]
        key = "cpu" if not user_args else "cfg-" + hashlib.sha256(" ".join(user_args).encode()).hexdigest()[:10]
        if args.tools:
            paths = build_tools(work, tools_dir(cache, key).parent, cmake_args)
            log(f"built {version} tools in {time.time() - t0:.0f} s")
            bin_dir = venv_bin(args.python)
            if bin_dir is not None:
                linked = link_tools(paths, bin_dir)
                if linked:
                    log(f"linked {', '.join(p.name for p in linked)} into {bin_dir}")
            for p in paths:
                print(p)
            return 0
        build(work, cache / "build" / key, cmake_args, args.python)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    log(f"installed {PACKAGE} {version} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

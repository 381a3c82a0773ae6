"""The commands in README.md and docs/ are true: every `pytriatt ...` command they show parses with today's
command line (no flag a user would paste is gone or misspelt), and the README's own examples on the default
model run as written, in order, and give what the text next to them promises."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
SUBCOMMANDS = ("run", "calibrate", "info", "plot", "doctor", "models", "eval", "bench", "serve")


# a synopsis names its values: parsed with stand-ins
PLACEHOLDERS = {"MODEL": "m.gguf", "N": "8", "FILE": "f.txt", "PROMPT": "hi", "P1,P2,...": "64,128", "B": "64",
                "T": "0.5", "K": "10", "P": "0.9", "R": "1.1"}


def concrete(cmd: str) -> str:
    """A synopsis as one command that uses every option it shows: [optional] parts kept, the first of A|B
    choices taken, ellipses dropped, placeholders replaced by stand-ins."""
    cmd = cmd.replace("[", " ").replace("]", " ")
    words = []
    for w in cmd.split():
        if w == "|" or w == "...":
            continue
        w = w.split("|")[0]
        words.append(PLACEHOLDERS.get(w, w.replace(",...", "")))
    return " ".join(words)


def documented_commands():
    """(file, command) of every pytriatt command shown in a code block or in backticks; synopses (with
    [optional] parts, A|B choices, ellipses, MODEL/N/FILE) are made concrete first (concrete())."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        blocks = [b for b in re.findall(r"```[a-z]*\n(.*?)```", text, re.S)]
        lines = [ln for b in blocks for ln in b.splitlines()]
        lines += re.findall(r"`(pytriatt [^`]+)`", text)
        # indented code (four spaces) in the docs
        lines += [ln.strip() for ln in text.splitlines() if ln.startswith("    pytriatt ")]
        for ln in lines:
            ln = ln.strip()
            ln = re.sub(r"^(tools/setup\.sh && )?\.venv/bin/", "", ln)
            if not ln.startswith("pytriatt "):
                continue
            cmd = ln.split("  #")[0].split(" # ")[0].rstrip(" \\").strip()
            words = cmd.split()
            if len(words) < 2 or words[1] not in SUBCOMMANDS or (len(words) == 2 and words[1] != "doctor"):
                continue       # a subcommand named in prose, not a command
            if len(words) > 2 and words[2] == "...":
                continue       # prose that elides the command ("pytriatt eval ... --json")
            found.append((doc.relative_to(ROOT).as_posix(), concrete(cmd)))
    return sorted(set(found))


COMMANDS = documented_commands()


def test_a_synopsis_becomes_one_command_with_all_its_options():
    assert concrete("pytriatt run [MODEL | -m MODEL] --policy tri|streaming [--per-head [head|layer]] -n N") == \
        "pytriatt run m.gguf -m m.gguf --policy tri --per-head head -n 8"


def test_the_docs_show_commands_of_every_main_subcommand():
    shown = {cmd.split()[1] for _, cmd in COMMANDS}
    assert {"run", "calibrate", "info", "plot", "eval", "bench", "serve"} <= shown


@pytest.mark.parametrize("where,cmd", COMMANDS, ids=[f"{w}:{c[:60]}" for w, c in COMMANDS])
def test_every_documented_command_parses(where, cmd, capsys):
    from pytriatt.cli import build_parser

    argv = shlex.split(cmd)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        if e.code == 0 and "--help" in argv:
            return
        pytest.fail(f"{where}: `{cmd}` does not parse: {capsys.readouterr().err.strip()}")
    assert args.func is not None


def test_a_removed_flag_would_be_caught():
    from pytriatt.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--no-such-flag"])


def pytriatt(*args, cwd, timeout=900):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "pytriatt", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def readme_block(after: str):
    """The commands of the README's first bash block after the line containing `after`."""
    text = (ROOT / "README.md").read_text()
    i = text.index(after)
    block = re.search(r"```bash\n(.*?)```", text[i:], re.S).group(1)
    return [ln.split("  #")[0].strip() for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, smollm2_path):
    d = tmp_path_factory.mktemp("readme")
    return d


@pytest.fixture(scope="module")
def calibrated(workdir):
    """The README's calibration example, run as written (its output is what the later examples use)."""
    line = next(ln for ln in readme_block("### Calibration") if ln.startswith("pytriatt calibrate smollm2"))
    run_readme_line(line, workdir)
    return workdir


def run_readme_line(line, cwd):
    argv = shlex.split(line)
    assert argv[0] == "pytriatt", line
    r = pytriatt(*argv[1:], cwd=cwd)
    assert r.returncode == 0, f"`{line}` failed ({r.returncode}):\n{r.stderr[-2000:]}"
    return r


def test_the_readme_calibration_examples_run_as_written(calibrated):
    workdir = calibrated
    lines = [ln for ln in readme_block("### Calibration") if "smollm2" in ln]
    assert [ln.split()[1] for ln in lines] == ["calibrate", "info", "plot"]
    pytest.importorskip("matplotlib")
    out = {}
    for ln in lines[1:]:
        out[ln.split()[1]] = run_readme_line(ln, workdir)
    assert (workdir / "smollm2.tri.gguf").is_file() and (workdir / "heads.png").stat().st_size > 0
    assert "calibration" in out["info"].stdout.lower() and "matches this model" in out["info"].stdout


def test_the_readme_budget_examples_run_as_written(calibrated):
    workdir = calibrated
    lines = readme_block("### Long generations with a fixed KV budget")
    assert [ln.split()[1] for ln in lines] == ["run", "run", "run"]
    tri = run_readme_line(lines[0], workdir)
    assert re.search(r"policy tri, budget 256.*: [1-9]\d* evictions", tri.stderr), tri.stderr[-1500:]
    streaming = json.loads(run_readme_line(lines[1], workdir).stdout)
    assert streaming["policy"] == "streaming" and streaming["evictions"] >= 1
    assert streaming["kv_cells_used"] <= 256 + 128 and streaming["stop"] == "n_predict"
    calibrated = run_readme_line(lines[2], workdir)
    assert re.search(r"policy tri, budget 256, interval 128, shift: [1-9]\d* evictions", calibrated.stderr), \
        calibrated.stderr[-1500:]


def test_the_readme_python_example_runs_as_written_and_its_comments_are_true(calibrated):
    workdir = calibrated
    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "kv_policy=" in b)
    lines = block.splitlines()
    sizes = next(ln for ln in lines if ln.startswith("llm.n_ctx(), llm.kv_cells"))
    stats = next(ln for ln in lines if ln.startswith("llm.kv_stats()"))
    claimed_sizes = [int(x) for x in re.findall(r"(\d+) \(", sizes.split("#")[1])]
    claimed_keys = re.findall(r"\b([a-z_]+)\b", "".join(ln.split("#")[1] for ln in lines[lines.index(stats):]))
    check = (f"\nassert (llm.n_ctx(), llm.kv_cells) == tuple({claimed_sizes}), (llm.n_ctx(), llm.kv_cells)"
             f"\nst = llm.kv_stats()\nmissing = [k for k in {claimed_keys} if k not in st]"
             f"\nassert not missing, missing"
             # the example's (seeded) story runs past budget + interval, so the cache was evicted; unseeded,
             # 4 of 11 stories tried ended before 640 tokens
             f"\nassert llm.n_tokens > 512 + 128 and st['n_rounds_total'] > 0, (llm.n_tokens, st)\n")
    r = subprocess.run([sys.executable, "-c", block + check], cwd=workdir, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]

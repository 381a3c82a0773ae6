"""What a user meets in the first hour (the "first hour" issue): output paths checked before the work and
write errors in one line; calibration text that is empty or too short; eval/bench settings under which no
eviction round can happen; the full-attention summary of `run`; `run -n -1`; `--debug` after the subcommand."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import pytest

from pytriatt import cli

pytest.importorskip("llama_cpp")


def run_main(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pytriatt", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def one_line_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err


# -- 1. every output path is checked before the work; a failing write is one line --------------------

def _the_work_must_not_start(monkeypatch):
    """Stand-ins for each command's work: reaching one means the output was not checked first."""
    def started(*a, **k):
        raise AssertionError("the work started before the output path was checked")
    import pytriatt.cli.bench as bench
    import pytriatt.cli.calibrate as calibrate
    import pytriatt.cli.eval as eval_
    monkeypatch.setattr(calibrate, "calibrate", started)
    monkeypatch.setattr(eval_, "evaluate", started)
    monkeypatch.setattr(bench, "run_bench", started)
    monkeypatch.setattr("pytriatt.modelinfo.plot_calibration", started)


COMMANDS = {
    "calibrate -o": lambda m, out: ["calibrate", m, "-o", out, "--tokens", "64"],
    "plot -o": lambda m, out: ["plot", m, "-o", out],
    "eval --plot": lambda m, out: ["eval", m, "--task", "nll", "--policies", "full,streaming", "--budgets", "48",
                                   "--tokens", "256", "--plot", out],
    "bench --plot": lambda m, out: ["bench", m, "--budget", "64", "--positions", "512", "--policies",
                                    "full,streaming", "--plot", out],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("where,message", [
    ("missing", "does not exist"),
    ("directory", "is a directory"),
    ("/sys/pytriatt-out", "does not take new files"),     # sysfs takes no new files, not even from root
    ("/proc/pytriatt-out", "does not take new files"),
])
def test_an_unwritable_output_is_refused_before_the_work(command, where, message, tiny_cal, tmp_path, capsys,
                                                         monkeypatch):
    suffix = ".gguf" if command.startswith("calibrate") else ".png"
    out = {"missing": tmp_path / "no-such-dir" / f"out{suffix}", "directory": tmp_path}.get(where, where + suffix)
    _the_work_must_not_start(monkeypatch)
    rc, _, err = run_main(capsys, *COMMANDS[command](tiny_cal, out))
    one_line_error(rc, err, "cannot write", message)
    assert sorted(p.name for p in tmp_path.iterdir()) == []            # the check leaves nothing behind


def test_a_write_that_fails_midway_is_one_line(tiny_gguf, tiny_cal, tmp_path, capsys, monkeypatch):
    """A file system that turns read-only (or fills up) after the check: one line, not a traceback."""
    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr("pytriatt.gguf_io.write_with_metadata", read_only)
    from pytriatt.calibrate import RECOMMENDED_TOKENS          # (fewer would add a warning line)
    rc, _, err = run_main(capsys, "calibrate", tiny_gguf("llama"), "-o", tmp_path / "out.gguf", "--tokens",
                          RECOMMENDED_TOKENS, "-c", "256", "-q")
    one_line_error(rc, err, f"cannot write {tmp_path / 'out.gguf'}: Read-only file system")
    monkeypatch.setattr("pytriatt.modelinfo.plot_calibration", read_only)
    rc, _, err = run_main(capsys, "plot", tiny_cal, "-o", tmp_path / "h.png")
    one_line_error(rc, err, f"cannot write {tmp_path / 'h.png'}: Read-only file system")


# -- 2. calibration text: empty is refused as empty; too short is warned about ------------------------

@pytest.mark.parametrize("text", ["/dev/null", "empty-file", "blank-file"])
def test_an_empty_calibration_text_is_refused_as_empty(text, tiny_gguf, tmp_path, capsys):
    if text != "/dev/null":
        path = tmp_path / f"{text}.txt"
        path.write_text("" if text == "empty-file" else " \n\n\t\n")
        text = str(path)
    rc, _, err = run_main(capsys, "calibrate", tiny_gguf("llama"), "-o", tmp_path / "out.gguf", "--text", text)
    one_line_error(rc, err, f"--text {text} is empty:")
    assert not (tmp_path / "out.gguf").exists()


def test_a_calibration_text_shorter_than_recommended_gets_one_warning_line(tiny_gguf, tmp_path, capsys):
    from pytriatt.calibrate import RECOMMENDED_TOKENS
    short = tmp_path / "short.txt"
    short.write_text("four words of text")
    rc, out, err = run_main(capsys, "calibrate", tiny_gguf("llama"), "-o", tmp_path / "out.gguf", "--text", short,
                            "--json")
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1, err
    assert "noisy" in warnings[0] and f"{RECOMMENDED_TOKENS} tokens" in warnings[0]
    assert "--text" in warnings[0]                                    # what to do: a longer text
    assert json.loads(out)["tokens"] < RECOMMENDED_TOKENS
    # asking for few tokens of a long text is warned about too, naming --tokens
    rc, _, err = run_main(capsys, "calibrate", tiny_gguf("llama"), "-o", tmp_path / "few.gguf", "--tokens", "64",
                          "-q")
    assert rc == 0 and [line for line in err.splitlines() if "warning" in line and "--tokens 64" in line], err


def test_enough_calibration_text_gives_no_warning(tiny_gguf, tmp_path, capsys):
    from pytriatt.calibrate import RECOMMENDED_TOKENS
    rc, _, err = run_main(capsys, "calibrate", tiny_gguf("llama"), "-o", tmp_path / "out.gguf", "--tokens",
                          RECOMMENDED_TOKENS, "-q")
    assert rc == 0 and "warning" not in err, err


# -- 3. eval and bench refuse settings under which no eviction round can happen -----------------------
# A round runs only once a sequence would exceed budget + interval (docs/eviction.md); below that every
# policy is full attention, and a table of ratios 1.000 says nothing.

@pytest.mark.parametrize("task,args", [
    ("nll", ["--budgets", "64", "--tokens", "10"]),                  # 10 tokens never exceed 64 + 128
    ("recall", ["--budgets", "2048", "--tokens", "1024"]),
    ("passkey", ["--budgets", "1024", "--tokens", "512"]),
    ("agree", ["--budgets", "512", "--tokens", "256", "--gen", "64"]),
    ("ruler", ["--budgets", "4096", "--tokens", "1024"]),
])
def test_eval_refuses_budgets_no_sequence_exceeds(task, args, tiny_cal, capsys, monkeypatch):
    def started(*a, **k):
        raise AssertionError("a task ran")
    for mod in ("nll", "recall", "passkey", "agree", "ruler"):
        monkeypatch.setattr(f"pytriatt.evaluation.{mod}.run_{mod}", started)
    rc, _, err = run_main(capsys, "eval", tiny_cal, "--task", task, "--policies", "full,tri,streaming", *args)
    one_line_error(rc, err, "no eviction round can happen", "raise --tokens")


def test_eval_skips_the_budgets_no_sequence_exceeds_and_says_which(tiny_gguf, capsys):
    rc, out, err = run_main(capsys, "eval", tiny_gguf("llama"), "--task", "nll", "--policies", "full,streaming",
                            "--budgets", "48,128,512", "--tokens", "256", "--json", "-q")
    assert rc == 0, err
    assert {r["budget"] for r in json.loads(out)} == {None, 48}
    notes = [line for line in err.splitlines() if "skipped" in line]
    assert len(notes) == 1 and "budgets 128, 512" in notes[0] and "256 tokens" in notes[0], err


def test_bench_refuses_positions_at_which_no_round_can_happen(tiny_gguf, capsys):
    rc, _, err = run_main(capsys, "bench", tiny_gguf("llama"), "--budget", "256", "--positions", "100",
                          "--policies", "full,streaming", "-q")
    one_line_error(rc, err, "no eviction round can happen", "--positions", "--budget")
    # full attention alone evicts nothing anyway: nothing to refuse
    rc, _, err = run_main(capsys, "bench", tiny_gguf("llama"), "--budget", "256", "--positions", "100",
                          "--policies", "full", "--window", "8", "-q", "--json")
    assert rc == 0, err


def test_bench_flags_the_positions_at_which_no_round_happens(tiny_gguf, capsys):
    rc, out, err = run_main(capsys, "bench", tiny_gguf("llama"), "--budget", "64", "--positions", "100,400",
                            "--policies", "full,streaming", "--window", "16", "-q", "--json")
    assert rc == 0, err
    notes = [line for line in err.splitlines() if "no eviction round" in line]
    assert len(notes) == 1 and "position 100" in notes[0] and "400" not in notes[0], err


# -- 4. the summary of a full-attention run says what it is ---------------------------------------

def test_a_full_attention_summary_does_not_compare_full_attention_with_itself(tiny_gguf, tiny_cal):
    r = run_cli("run", tiny_gguf("llama"), "-p", "hello", "-n", "8", "-c", "256", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    summary = r.stderr[r.stderr.index("stopped because"):]
    assert "would need" not in summary
    assert "full attention: KV memory allocated" in summary and "256 cells" in summary
    assert "this sequence uses" in summary
    # with a budget the comparison is the point: what full attention would need for the same sequence
    r = run_cli("run", tiny_cal, "--budget", "64", "--interval", "32", "-p", "hello", "-n", "120", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert "full attention would need" in r.stderr


# -- 5. run -n -1: until an end-of-generation token or a full context, as llama-cli ----------------

def test_run_n_minus_one_generates_until_the_context_is_full(tiny_gguf):
    r = run_cli("run", tiny_gguf("llama"), "-p", "hello", "-n", "-1", "-c", "256", "--ignore-eos", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["stop"] == "ctx_full"
    assert out["n_prompt"] + out["n_generated"] == out["n_ctx"] == 256
    r = run_cli("run", tiny_gguf("llama"), "-p", "hello", "-n", "-1", "-c", "256", "--ignore-eos")
    assert r.returncode == 0 and "stopped because the context is full (256 tokens, -c)" in r.stderr, r.stderr
    # without --ignore-eos an end-of-generation token may end it first; either way it ends
    r = run_cli("run", tiny_gguf("llama"), "-p", "hello", "-n", "-1", "-c", "256", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["stop"] in ("eog", "ctx_full"), r.stderr


@pytest.mark.parametrize("n", ["0", "-2"])
def test_other_non_positive_n_are_refused_naming_minus_one(tiny_gguf, n, capsys):
    rc, _, err = run_main(capsys, "run", tiny_gguf("llama"), "-p", "hi", "-n", n)
    one_line_error(rc, err, "-n/--n-predict", "-1")


def test_run_help_documents_n_minus_one(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split()).replace("- ", "-")     # argparse wraps at hyphens
    assert "-1: until an end-of-generation token or a full context" in out


# -- 6. --debug before or after the subcommand -----------------------------------------------------

@pytest.mark.parametrize("argv", [["--debug", "info"], ["info", "--debug"]])
def test_debug_is_accepted_before_and_after_the_subcommand(argv, tmp_path):
    r = run_cli(*argv, tmp_path / "missing.gguf")
    assert "Traceback" in r.stderr and "no such file" in r.stderr, r.stderr
    r = run_cli("info", tmp_path / "missing.gguf")
    one_line_error(r.returncode, r.stderr, "no such file")


def test_debug_parses_after_every_subcommand_and_defaults_to_off():
    from pytriatt.cli import build_parser
    ap = build_parser()
    assert ap.parse_args(["run", "--debug"]).debug is True
    assert ap.parse_args(["--debug", "run"]).debug is True
    assert ap.parse_args(["models", "list", "--debug"]).debug is True
    assert ap.parse_args(["run"]).debug is False

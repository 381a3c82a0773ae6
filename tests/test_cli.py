"""Specification of the `pytriatt` command line and of the package's behaviour without the patch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import pytriatt
from pytriatt import cli

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args, check_rc=None):
    r = subprocess.run([sys.executable, "-m", "pytriatt", *args], capture_output=True, text=True, timeout=600)
    if check_rc is not None:
        assert r.returncode == check_rc, r.stderr
    return r


def test_version():
    r = run_cli("--version", check_rc=0)
    assert r.stdout.strip() == f"pytriatt {pytriatt.__version__}"


def test_doctor_reports_the_patched_build_and_its_patches():
    r = run_cli("doctor", "--json", check_rc=0)
    rep = json.loads(r.stdout)
    assert rep["patched"] is True
    assert "llama.cpp/0001-memory-seq-positions.patch" in rep["patches"]
    assert "llama.cpp/0002-triatt-core-sources.patch" in rep["patches"]
    assert rep["core_in_libllama"] is True  # cpp/ is compiled into libllama
    assert "llama-cpp-python/0001-memory-seq-positions-bindings.patch" in rep["patches"]
    assert rep["llama_cpp"].startswith("0.3.36+triatt.")
    assert "cpu" in rep["backends"]
    assert "version" in rep["core"]


def test_run_generates_on_a_tiny_model(tiny_gguf):
    r = run_cli("run", str(tiny_gguf("qwen2")), "-p", "hello", "-n", "12", "-c", "256", "--json", check_rc=0)
    out = json.loads(r.stdout)
    assert out["n_generated"] == 12
    # the run leaves prompt + generated tokens in the cache (minus the last sampled one, not yet decoded)
    assert out["kv_cells_used"] == out["n_prompt"] + out["n_generated"] - 1
    assert out["kv_cells"] == 256


@pytest.mark.real
def test_run_generates_text_on_smollm2(smollm2_path):
    # the README's main command: an instruct model, so the prompt goes through its chat template
    r = run_cli("run", "smollm2-135m", "-p", "Name the capital of France.", "-n", "16", "--json", check_rc=0)
    out = json.loads(r.stdout)
    assert out["n_generated"] >= 1 and out["chat_template"] is True
    assert "Paris" in out["text"]
    # --raw continues the text instead
    r = run_cli("run", "smollm2-135m", "--raw", "-p", "The capital of France is", "-n", "16", "--json", check_rc=0)
    assert "Paris" in json.loads(r.stdout)["text"]


def test_bad_model_arguments_are_one_line_errors(tmp_path, tiny_gguf):
    r = run_cli("run", str(tmp_path / "missing.gguf"), check_rc=2)
    assert "no such file, and not a known model name" in r.stderr
    r = run_cli("run", str(tmp_path), check_rc=2)
    assert "is a directory" in r.stderr
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    r = run_cli("run", str(junk), "-n", "4", check_rc=2)
    assert "is not a GGUF file" in r.stderr
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf("llama").read_bytes()[:50_000])
    r = run_cli("run", str(truncated), "-n", "4", check_rc=2)
    # the exact reason (the header check before loading), not llama.cpp's generic failure
    assert "is truncated: its tensor data ends" in r.stderr and "could not load" not in r.stderr
    for res in (r,):
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    r = run_cli("models", "get", "no-such-model", check_rc=2)
    assert "unknown model" in r.stderr


STOCK_SCRIPT = r"""
import sys, types
# a stock llama-cpp-python: the module imports, but has none of the patch's functions
stock = types.ModuleType("llama_cpp"); stock.__version__ = "0.3.36"; stock.__path__ = []
sys.modules["llama_cpp"] = stock
import pytriatt
try:
    pytriatt.seq_positions(None, 0)
except pytriatt.PatchMissingError as e:
    print("ERR", e)
"""


def test_import_works_with_stock_llama_cpp_python_and_names_the_fix():
    r = subprocess.run([sys.executable, "-c", STOCK_SCRIPT], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ERR ")
    assert "llama_memory_seq_positions" in r.stdout
    assert "tools/build_llama.py" in r.stdout


def test_import_works_without_llama_cpp_python():
    script = "import sys; sys.modules['llama_cpp'] = None; import pytriatt; print(pytriatt.__version__)"
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == pytriatt.__version__, r.stderr


def test_the_readme_commands_are_the_ones_ci_runs(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    from readme_command import readme_command

    assert "readme_command.py test" in (REPO / ".ci" / "run").read_text()
    test_cmd = readme_command("test")
    assert test_cmd.startswith("tools/setup.sh") and "pytest" in test_cmd
    main_cmd = readme_command("main")
    assert main_cmd.startswith("tools/setup.sh") and "pytriatt run" in main_cmd


def test_a_budget_on_a_sliding_window_model_says_the_local_layers_keep_their_window(tiny_gguf):
    """Gemma 3's local layers keep their own window; the budget applies to the global layers"""
    from pytriatt.cli.common import sliding_window_note
    gemma = tiny_gguf("gemma3")
    note = sliding_window_note(gemma, 32)
    assert note and "keep their own 64-token window" in note and "--budget 32 applies to its global" in note
    assert sliding_window_note(tiny_gguf("llama"), 128) is None

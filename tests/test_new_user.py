"""What a new user meets first (issue 18): the chat template by default, a stop reason and a hint when
nothing is generated, llama.cpp's flags (-m, -t, -fa, sampling), budgets that cannot mean what was asked,
Llama's n_ctx with a KV policy, and --calibrate's size and cache file name."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

llama_cpp = pytest.importorskip("llama_cpp")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pytriatt", *map(str, args)], capture_output=True, text=True,
                          timeout=900)


@pytest.mark.real
def test_run_talks_to_an_instruct_model_through_its_chat_template(smollm2_path):
    """The README's tri example used to print nothing: the instruct model ends a bare prompt at once."""
    r = run_cli("run", "smollm2-135m", "--policy", "streaming", "--budget", "256", "-n", "40",
                "-p", "Tell me a long story.", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["chat_template"] is True and out["n_generated"] > 0
    assert out["stop"] in ("eog", "n_predict")
    # --raw: the old behaviour, now explained
    r = run_cli("run", "smollm2-135m", "--raw", "-n", "40", "-p", "Tell me a long story.", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n_generated"] == 0                               # greedy: the same every run
    assert out["stop"] == "eog" and "nothing was generated" in r.stderr and "--ignore-eos" in r.stderr


def test_the_summary_says_why_generation_stopped(tiny_gguf):
    r = run_cli("run", tiny_gguf("llama"), "-p", "hello", "-n", "12", "-c", "256")
    assert r.returncode == 0, r.stderr
    assert "stopped because" in r.stderr
    r = run_cli("run", tiny_gguf("llama"), "-p", "hello", "-n", "12", "-c", "256", "--ignore-eos", "--json")
    assert json.loads(r.stdout)["stop"] == "n_predict"


def test_llama_cpp_flags_are_accepted(tiny_gguf, tiny_cal):
    r = run_cli("run", "-m", tiny_gguf("llama"), "-t", "1", "-p", "hi", "-n", "4", "-c", "256", "--json",
                "--top-k", "10", "--top-p", "0.9", "--repeat-penalty", "1.1", "--temp", "0.7")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n_generated"] <= 4
    r = run_cli("info", "-m", tiny_cal, "--json")
    assert r.returncode == 0, r.stderr
    r = run_cli("info", tiny_cal, "-m", tiny_gguf("llama"))
    assert r.returncode == 2 and "two models given" in r.stderr
    r = run_cli("info")
    assert r.returncode == 2 and "no model given" in r.stderr and "-m MODEL" in r.stderr


def test_a_quantized_v_cache_turns_flash_attention_on(tiny_gguf):
    """-ctv q8_0 used to fail as 'truncated or corrupt': quantized V needs flash attention."""
    model = tiny_gguf("llama", n_embd=128)                       # head_dim 32: whole q8_0 blocks
    common = ("run", model, "-p", "hi", "-n", "40", "--ignore-eos", "--budget", "64", "--interval", "32",
              "--policy", "streaming", "-ctk", "q8_0", "-ctv", "q8_0", "--json")
    r = run_cli(*common)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n_generated"] == 40
    r = run_cli(*common, "-fa", "off")
    assert r.returncode == 2 and "needs flash attention" in r.stderr and "Traceback" not in r.stderr
    # head_dim 16 is not a whole number of q8_0 blocks: said so, not "truncated or corrupt"
    r = run_cli("run", tiny_gguf("llama"), "-p", "hi", "-n", "4", "-ctk", "q8_0", "-ctv", "q8_0")
    assert r.returncode == 2 and "multiple of the type's block" in r.stderr and "corrupt" not in r.stderr


@pytest.mark.parametrize("args,message", [
    (("--budget", "64", "--policy", "full"), "--policy full keeps every token"),
    (("--budget", "300", "-c", "256"), "is not below the longest sequence (256 tokens"),
    (("--budget", "100000"), "is not below the longest sequence"),
])
def test_budgets_that_cannot_mean_what_was_asked_are_refused(tiny_cal, args, message):
    r = run_cli("run", tiny_cal, "-p", "hi", "-n", "4", *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_llama_n_ctx_with_a_policy_is_the_trained_context(tiny_cal):
    """A budget lengthens generation: n_ctx (the longest sequence) defaults to the trained context, not
    llama-cpp-python's 512, while the cache stays at budget + max(interval, n_batch) cells."""
    llm = llama_cpp.Llama(str(tiny_cal), kv_policy="tri", kv_budget=64, kv_interval=32, n_batch=32, verbose=False)
    assert llm.n_ctx() == 4096 and llm.kv_cells == 256
    out = llm.create_completion("hello", max_tokens=700, temperature=0.0, logit_bias={2: -100.0})
    assert out["usage"]["completion_tokens"] == 700
    assert llama_cpp.Llama(str(tiny_cal), verbose=False).n_ctx() == 512          # stock default without a policy
    small = llama_cpp.Llama(str(tiny_cal), kv_policy="tri", kv_budget=64, n_ctx=128, verbose=False)
    with pytest.raises(ValueError, match="pass a larger n_ctx"):
        small.create_completion("hello " * 200, max_tokens=4)


def test_calibrate_on_the_fly_takes_a_size_and_names_its_file_safely(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTRIATT_CACHE", str(tmp_path))
    r = run_cli("run", tiny_gguf("llama"), "--budget", "64", "--calibrate", "--calib-tokens", "600", "-p", "hi",
                "-n", "4")
    assert r.returncode == 0, r.stderr
    assert "on 600 tokens" in r.stderr
    made = list((tmp_path / "calibrated").glob("*.calib.gguf"))
    assert len(made) == 1 and ":" not in made[0].name and "-600.calib.gguf" in made[0].name


def test_errors_for_a_missing_calibration_name_every_way_out(tiny_gguf):
    with pytest.raises(ValueError) as e:
        llama_cpp.Llama(str(tiny_gguf("llama")), kv_policy="tri", kv_budget=64, verbose=False)
    assert "pytriatt calibrate" in str(e.value) and "kv_calib=" in str(e.value) and "streaming" in str(e.value)
    # --calib FILE without statistics: say that FILE is the problem, not "pass --calib FILE"
    r = run_cli("run", tiny_gguf("llama"), "--budget", "64", "--calib", tiny_gguf("llama"), "-n", "4", "-p", "hi")
    assert r.returncode == 2 and "--calib" in r.stderr and "carries no TriAttention statistics" in r.stderr
    assert "pass --calib FILE" not in r.stderr and "pytriatt calibrate" in r.stderr


def test_kv_stats_totals_only_grow_across_turns(tiny_cal):
    """Per-sequence counters restart when a new prompt shares nothing with the cache; the totals do not."""
    llm = llama_cpp.Llama(str(tiny_cal), kv_policy="tri", kv_budget=64, kv_interval=32, n_batch=32, verbose=False)
    seen = []
    for turn in range(3):
        llm.create_completion(f"{turn} " + "the water was long " * 12, max_tokens=120, temperature=0.0,
                              logit_bias={2: -100.0})
        st = llm.kv_stats()
        seen.append((st["n_rounds_total"], st["n_evicted_total"], st["n_rounds"], st["n_evicted"]))
        assert st["n_evicted_total"] >= st["n_evicted"] and st["n_rounds_total"] >= st["n_rounds"]
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(seen, seen[1:]))


def test_a_conversation_says_what_it_lost_and_kv_protect_prompt_keeps_the_first_turn(tiny_cal):
    def chat(**kw):
        llm = llama_cpp.Llama(str(tiny_cal), kv_policy="tri", kv_budget=128, kv_interval=32, n_batch=32,
                              chat_format="chatml", verbose=False, **kw)
        msgs = [{"role": "system", "content": "You are Ada. The user is called Grace."}]
        first = None
        for turn in range(3):
            msgs.append({"role": "user", "content": f"turn {turn}: tell me about the water " * 2})
            out = llm.create_chat_completion(msgs, max_tokens=60, temperature=0.0, logit_bias={2: -100.0})
            msgs.append(out["choices"][0]["message"])
            if first is None:
                first = llm.kv_stats()["n_prompt"]
        return llm, first

    llm, _ = chat()
    st = llm.kv_stats()
    assert st["n_prompt"] > 128 and st["n_evicted_prompt"] > 0          # the earlier turns lost tokens
    llm, first = chat(kv_protect_prompt=True)
    import pytriatt
    assert set(range(first)) <= set(pytriatt.seq_positions(llm, 0).tolist())   # the first turn, all of it


def test_every_subcommand_spells_llamas_flags_one_way_with_one_default():
    """-m, -t, -ngl, -c, -ctk/-ctv and -fa mean the same everywhere they apply, with the same defaults (bench keeps
    llama.cpp's automatic flash attention and has no -c: its --positions are its sequence lengths; calibrate's
    -c is its window and it keeps no KV cache types)."""
    from pytriatt.cli import build_parser

    ap = build_parser()
    sub = next(a for a in ap._actions if a.dest == "command").choices
    flags = {name: {s for a in p._actions for s in a.option_strings} for name, p in sub.items()}
    for name in ("run", "serve", "eval", "bench", "calibrate"):
        assert {"-m", "-t", "-ngl"} | ({"-c"} if name != "bench" else set()) <= flags[name], name
    for name in ("run", "serve", "eval", "bench"):
        assert {"-ctk", "-ctv"} | ({"-fa"} if name != "bench" else set()) <= flags[name], name
    extra = {"eval": ["--task", "nll"], "calibrate": ["-o", "x.gguf"]}
    defaults = {}
    for name in ("run", "serve", "eval", "bench", "calibrate"):
        args = ap.parse_args([name, "m.gguf"] + extra.get(name, []))
        defaults[name] = (args.threads, args.n_gpu_layers, getattr(args, "cache_type_k", "f16"),
                          getattr(args, "cache_type_v", "f16"), getattr(args, "flash_attn", "auto"),
                          getattr(args, "calib_tokens", 8192))
    assert len(set(defaults.values())) == 1, defaults


def test_eval_takes_llamas_runtime_flags(tiny_gguf):
    r = run_cli("eval", tiny_gguf("llama"), "--task", "nll", "--policies", "full,streaming", "--budgets", "48",
                "--interval", "32", "-c", "160", "-t", "1", "-ngl", "0", "-ctk", "bf16", "-ctv", "f16", "-fa", "on", "--json", "-q")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {x["policy"] for x in rows} == {"full", "streaming"} and all(x["n"] > 0 for x in rows)
    r = run_cli("eval", tiny_gguf("llama"), "--task", "nll", "--budgets", "48", "-ctv", "q8_0", "-fa", "off")
    assert r.returncode == 2 and "needs flash attention" in r.stderr
    # the tiny model's heads (16 values) cannot hold q8_0 blocks (32): said as such, not as a bad n_ctx
    r = run_cli("eval", tiny_gguf("llama"), "--task", "nll", "--policies", "full", "-c", "160", "-ctk", "q8_0",
                "-fa", "on")
    assert r.returncode == 2 and "multiple of the type's block" in r.stderr

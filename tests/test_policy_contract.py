"""The policy contract (cpp/triatt-policy.h) has one owner: every front end (pytriatt's commands, `pytriatt
eval`, Context.set_kv_policy, Llama(kv_*=), llama.cpp's --kv-* flags) accepts and refuses the same settings
with one message, its options spelled the way that front end spells them."""

from __future__ import annotations

import subprocess

import pytest

from pytriatt import _core, policy
from pytriatt.cli import main

llama_cpp = pytest.importorskip("llama_cpp")

# settings -> the refusal, written with {o(name)} for the option as each front end spells it. n_ctx: the
# longest sequence (-c); "per_head": the granularity by name
REFUSED = [
    (dict(policy="streaming", budget=0), "{budget} 0 is out of range: it must be at least 1"),
    (dict(policy="streaming", budget=64, interval=0), "{interval} 0 is out of range: it must be at least 1"),
    (dict(policy="tri", budget=64, horizon=0),
     "{horizon} 0 is out of range: it must be at least 1 (-1: the default rule)"),
    (dict(policy="streaming", budget=8, sink=8), "{sink} 8 + {window} 1 exceed {budget} 8: the protected tokens "
                                                 "must fit in the budget"),
    (dict(policy="tri", budget=64, window=61), "{sink} 4 + {window} 61 exceed {budget} 64"),
    (dict(policy="streaming", budget=64, per_head="head"),
     "{per_head} ranks tokens per head, which only tri and snapkv do (not streaming)"),
    (dict(policy="streaming", budget=512, n_ctx=256),
     "{budget} 512 is not below the longest sequence (256 tokens, the context size): nothing would ever be evicted"),
]
NAMES = ("budget", "interval", "sink", "window", "horizon", "per_head")


def spelled(message: str, prefix: str) -> str:
    dash = prefix.startswith("--")
    return message.format(**{n: prefix + (n.replace("_", "-") if dash else n) for n in NAMES})


def cli_args(s: dict, prefix: str) -> list[str]:
    out = []
    for name, value in s.items():
        flag = "-c" if name == "n_ctx" else prefix + name.replace("_", "-")
        out += [flag, str(value)]
    return out


def ids(case):
    return ",".join(f"{k}={v}" for k, v in case[0].items())


@pytest.mark.parametrize("settings,message", REFUSED, ids=[ids(c) for c in REFUSED])
def test_every_front_end_refuses_the_same_settings_with_the_same_message(settings, message, tiny_cal, capsys):
    # the core itself (what libllama's llama_kv_policy_check returns)
    s = policy.settings(settings["policy"], settings["budget"],
                        **{k: v for k, v in settings.items() if k not in ("policy", "budget", "n_ctx")})
    assert spelled(message, "") in _core.policy_check(s, settings.get("n_ctx", 0), "")

    # pytriatt run and serve (one line, exit 2)
    for command in ("run", "serve"):
        assert main([command, str(tiny_cal), *cli_args(settings, "--")]) == 2
        err = capsys.readouterr().err
        assert spelled(message, "--") in err and err.count("\n") == 1, (command, err)

    # Llama(kv_*=): n_ctx is its own keyword; the error is a KVPolicyError (a ValueError), so callers need not
    # read its text to tell it from a model that does not load
    kw = {("n_ctx" if k == "n_ctx" else f"kv_{k}"): v for k, v in settings.items()}
    with pytest.raises(llama_cpp.KVPolicyError) as e:
        llama_cpp.Llama(str(tiny_cal), verbose=False, **kw)
    assert spelled(message, "kv_") in str(e.value)

    # Context.set_kv_policy (the evaluation harness's way in); it has no longest sequence
    if "n_ctx" not in settings:
        from pytriatt.context import Context, Model
        m = Model(tiny_cal)
        try:
            with Context(m, n_ctx=256) as ctx, pytest.raises(ValueError) as e:
                ctx.set_kv_policy(**settings)
            assert spelled(message, "") in str(e.value)
        finally:
            m.close()


@pytest.mark.real
@pytest.mark.parametrize("settings,message", REFUSED, ids=[ids(c) for c in REFUSED])
def test_llama_cpp_flags_refuse_them_with_the_same_message(settings, message, llama_tools, tiny_cal):
    # common_params_parse refuses the flags before the model is loaded
    r = subprocess.run([str(llama_tools["llama-server"]), "-m", str(tiny_cal), *cli_args(settings, "--kv-"),
                        "--port", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and spelled(message, "--kv-") in r.stdout + r.stderr


def test_an_option_without_a_policy_is_refused_not_ignored(tiny_cal):
    with pytest.raises(llama_cpp.KVPolicyError, match=r"^kv_budget set without kv_policy: pass kv_policy='tri'"):
        llama_cpp.Llama(str(tiny_cal), verbose=False, kv_budget=256)
    with pytest.raises(ValueError, match=r"^kv_sink, kv_per_head set without kv_policy"):
        llama_cpp.Llama(str(tiny_cal), verbose=False, kv_sink=2, kv_per_head=True)


def test_llamas_kv_keywords_default_to_libllamas_defaults(tiny_cal):
    """None everywhere: the settings a policy runs with come from the contract (llama_kv_policy_default_params)."""
    import inspect

    kw = {k: v.default for k, v in inspect.signature(llama_cpp.Llama.__init__).parameters.items() if k.startswith("kv_")}
    assert set(kw.values()) == {None} and len(kw) >= 10
    llm = llama_cpp.Llama(str(tiny_cal), verbose=False, kv_policy="streaming", n_ctx=4096)
    st = llm.kv_stats()
    assert (st["budget"], st["interval"]) == (policy.DEFAULT_BUDGET, policy.DEFAULT_INTERVAL) == (2048, 128)


def test_libllama_and_pytriatt_core_carry_the_same_contract():
    """Two builds of triatt-policy.cpp (libllama, pytriatt._core): a stale one would disagree here."""
    import ctypes

    p = llama_cpp.llama_kv_policy_default_params()
    d = _core.PolicySettings()
    assert (p.budget, p.interval, p.n_sink, p.n_window, p.horizon, p.snap_window) == \
        (d.budget, d.interval, d.sink, d.window, d.horizon, d.snap_window)
    names = []
    while (name := llama_cpp.llama_kv_policy_type_name(len(names))) is not None:
        names.append(name.decode())
    assert tuple(names) == policy.POLICIES == ("full", "tri", "streaming", "random", "snapkv")
    p.type, p.budget, p.n_sink = llama_cpp.LLAMA_KV_POLICY_STREAMING, 8, 8
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_kv_policy_check(ctypes.byref(p), 0, b"--kv-", buf, len(buf))
    assert n == len(buf.value) > 0 and buf.value.decode() == _core.policy_check(
        policy.settings("streaming", 8, sink=8), 0, "--kv-")


def test_the_policy_table_answers_what_each_front_end_asks():
    rows = {r["name"]: r for r in _core.policy_table()}
    assert [n for n, r in rows.items() if not r["evicts"]] == ["full"]
    assert policy.PER_HEAD_POLICIES == ("tri", "snapkv") == policy.SCORING_POLICIES
    assert policy.CALIBRATED_POLICIES == ("tri",)
    assert _core.granularity_names() == ["shared", "head", "layer"]


def test_a_policy_variant_has_one_spelling_in_eval_and_bench():
    """NAME[@head|@layer][/paper|/w=N|/h=N][+shift][:TYPE]: pytriatt.policy.parse_variant reads it for both."""
    from pytriatt.benchmark.harness import parse_policies
    from pytriatt.errors import UserError
    from pytriatt.evaluation.common import check_supported, policy_settings, split_policy

    v = policy.parse_variant("tri@head/w=32/h=1024+shift:q8_0")
    assert (v.policy, v.per_head, v.settings, v.shift, v.cache_type) == \
        ("tri", "head", {"window": 32, "horizon": 1024}, True, "q8_0")
    assert policy.parse_variant("tri/paper").settings == {"window": 1, "horizon": policy.PAPER_HORIZON}
    # the same per-head spelling in both commands
    spec, = parse_policies("snapkv@layer/paper", "f16", "f16")
    assert (spec.policy, spec.per_head, spec.settings) == ("snapkv", "layer", policy.PRESETS["paper"])
    check_supported(["snapkv@layer/paper"])
    assert split_policy("snapkv@layer/paper") == ("snapkv", "layer")
    assert policy_settings("snapkv@layer/paper") == policy.PRESETS["paper"]
    # the former bench spelling is refused with the one spelling, by both
    for parse in (lambda t: parse_policies(t, "f16", "f16"), lambda t: check_supported([t])):
        with pytest.raises(UserError, match="per-head eviction is written tri@head"):
            parse("tri+head")
        with pytest.raises(UserError, match="which only tri and snapkv do"):
            parse("streaming@head")
    # what eval sets with a flag of its own is refused in a variant, saying which flag
    with pytest.raises(UserError, match="pass --shift"):
        check_supported(["tri+shift"])
    with pytest.raises(UserError, match="pass -ctk/-ctv"):
        check_supported(["tri:q8_0"])


@pytest.mark.parametrize("args,message", [
    (["--kv_policy", "trii"], "unknown kv_policy 'trii' (known: full, tri, streaming, random, snapkv)"),
    (["--kv_policy", "streaming", "--kv_budget", "8", "--kv_sink", "8"], spelled(REFUSED[3][1], "kv_")),
])
def test_llama_cpp_python_server_refuses_them_before_loading_without_a_traceback(tiny_cal, args, message):
    pytest.importorskip("fastapi")
    pytest.importorskip("pydantic_settings")
    import sys
    r = subprocess.run([sys.executable, "-m", "llama_cpp.server", "--model", str(tiny_cal), *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and message in r.stderr + r.stdout and "Traceback" not in r.stderr

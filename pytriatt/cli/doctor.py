"""`pytriatt doctor`: is the patched llama-cpp-python installed, with which patches and backends?"""

from __future__ import annotations

from pathlib import Path

from .. import __version__, _llama
from .common import add_model_argument, print_json


def add_parser(sub) -> None:
    p = sub.add_parser("doctor", help="check the patched llama-cpp-python build",
                       description="Report whether the pytriatt-patched llama-cpp-python is installed, which "
                                   "patches it carries and which backends it was built for. Exit status 1 if "
                                   "something needs fixing (the report says how).")
    add_model_argument(p, required=False, help="also check this GGUF (path or model name): does TriAttention "
                                               "apply, how it is scored, which policies attach (exit status 1 if "
                                               "tri does not)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)


def doctor_report() -> dict:
    rep: dict = {"pytriatt": __version__}
    try:
        from .. import _core
        rep["core"] = dict(_core.build_info())
    except ImportError as e:
        rep["core"] = {"error": f"pytriatt._core is not built ({e})"}
        rep["problem"] = "pytriatt's C++ extension is missing; reinstall pytriatt: tools/setup.sh"
    try:
        lc = _llama.import_llama_cpp()
    except _llama.PatchMissingError as e:
        rep.update(llama_cpp=None, patched=False, problem=str(e))
        return rep
    info = _llama.patch_info()
    rep["llama_cpp"] = getattr(lc, "__version__", "?")
    rep["llama_cpp_path"] = str(Path(lc.__file__).parent)
    try:
        _llama.require_patched()
        rep["patched"] = info is not None
    except _llama.PatchMissingError as e:
        rep["patched"] = False
        rep["problem"] = str(e)
    if info is None:
        rep["problem"] = f"llama_cpp carries no pytriatt build manifest. Fix: {_llama.FIX_COMMAND}"
    rep["patches"] = [p["name"] for p in info["patches"]] if info else []
    rep["cmake_args"] = info.get("cmake_args", []) if info else []
    rep["backends"] = _llama.built_backends()
    rep["gpu_offload"] = bool(lc.llama_supports_gpu_offload())
    rep["core_in_libllama"] = _llama.core_in_libllama()
    # patches in this checkout that the installed build does not carry (or carries in another version)
    repo_patches = Path(__file__).resolve().parent.parent / "patches"
    if info and repo_patches.is_dir():
        import hashlib
        have = {p["name"]: p["sha256"] for p in info["patches"]}
        stale = []
        for f in sorted(repo_patches.glob("*/*.patch")):
            name = f"{f.parent.name}/{f.name}"
            if have.get(name) != hashlib.sha256(f.read_bytes()).hexdigest():
                stale.append(name)
        if stale:
            rep["problem"] = (f"the installed build predates patches in {repo_patches}: {', '.join(stale)}. "
                              f"Fix: {_llama.FIX_COMMAND}")
    return rep


def cmd_doctor(args) -> int:
    if getattr(args, "model", None):
        return cmd_doctor_model(args)
    rep = doctor_report()
    if args.json:
        print_json(rep)
    else:
        print(f"pytriatt        {rep['pytriatt']}")
        core = rep["core"]
        print(f"pytriatt._core  {core.get('error') or core.get('compiler')}")
        print(f"llama-cpp-python {rep.get('llama_cpp') or 'not installed'}"
              + (f"  ({rep['llama_cpp_path']})" if rep.get("llama_cpp_path") else ""))
        print(f"patched         {'yes' if rep.get('patched') else 'no'}")
        for p in rep.get("patches", []):
            print(f"  patch         {p}")
        if rep.get("llama_cpp"):
            print(f"backends        {', '.join(rep['backends']) or '?'}"
                  f"{'  (GPU offload available)' if rep['gpu_offload'] else ''}")
            print(f"CMAKE_ARGS      {' '.join(rep['cmake_args']) or '(default)'}")
            print(f"core in libllama {'yes' if rep['core_in_libllama'] else 'no'}")
        if rep.get("problem"):
            print(f"problem: {rep['problem']}")
    return 0 if rep.get("patched") and "problem" not in rep else 1




def cmd_doctor_model(args) -> int:
    """`pytriatt doctor MODEL`: the build report, then whether TriAttention applies to MODEL and why not."""
    from .. import modelinfo
    from .common import load_checked

    rep = doctor_report()
    sup = modelinfo.support_report(load_checked(args.model))
    if args.json:
        print_json({**rep, "model": sup})
    else:
        print(f"patched         {'yes' if rep.get('patched') else 'no'}"
              + (f"  (problem: {rep['problem']})" if rep.get("problem") else ""))
        print(modelinfo.format_support(sup))
    return 0 if rep.get("patched") and "problem" not in rep and sup["supported"] else 1

"""The package's layering (docs/ARCHITECTURE.md): no import circle, the command line on top (no library module
imports pytriatt.cli), subcommand modules that import pytriatt.cli.common and never each other, and no private
name imported from another module. Imports inside functions count: a circle through a lazy import is still one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "pytriatt"


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}
EXTENSIONS = {"pytriatt._core"}      # built from cpp/ by CMakeLists.txt: a module without Python source


def _resolve(name: str, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom in module `name` imports from."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str):
    """(imported module, imported names) of every import in module `name` that stays inside pytriatt."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("pytriatt"):
                    yield a.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("pytriatt"):
                continue
            names = [a.name for a in node.names]
            # `from . import x` imports the module x when there is one
            submodules = [n for n in names if f"{target}.{n}" in MODULES or f"{target}.{n}" in EXTENSIONS]
            for n in submodules:
                yield f"{target}.{n}", []
            rest = [n for n in names if n not in submodules]
            if rest or not submodules:
                yield target, rest


def graph() -> dict:
    g = {}
    for name in MODULES:
        g[name] = {t for t, _ in imports(name) if t in MODULES and t != name}
    return g


def find_cycle(g: dict):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_import_graph_has_no_circle():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_library_module_imports_the_command_line():
    offenders = {n: sorted(d) for n, d in graph().items()
                 if not n.startswith("pytriatt.cli") and n not in ("pytriatt.__main__",)
                 and any(t.startswith("pytriatt.cli") for t in d)}
    assert not offenders, offenders


def test_subcommand_modules_import_common_never_each_other():
    subcommands = {n for n in MODULES if n.startswith("pytriatt.cli.") and n != "pytriatt.cli.common"}
    assert {"pytriatt.cli.run", "pytriatt.cli.serve", "pytriatt.cli.eval", "pytriatt.cli.bench"} <= subcommands
    for n in subcommands:
        assert "pytriatt.cli.common" in graph()[n], f"{n} does not use cli/common.py"
        bad = sorted(t for t in graph()[n] if t.startswith("pytriatt.cli") and t != "pytriatt.cli.common")
        assert not bad, f"{n} imports {bad}"


# docs/ARCHITECTURE.md's layers, bottom up; a module imports from its own layer or below
LAYERS = [
    ("base", ("policy", "errors", "gguf_io", "gguf_model", "rope", "fingerprint", "calibration", "selection", "core",
              "corpus", "report", "models", "_core")),
    ("llama", ("context", "_llama", "ggml_tensors")),
    ("jobs", ("calibrate", "serve", "evaluation", "benchmark", "modelinfo", "testing")),
    ("cli", ("cli",)),
]
# the package itself stands outside the layers
OUTSIDE = {"pytriatt", "pytriatt.__main__"}


def layer_of(module: str) -> int:
    top = module.split(".")[1]
    return next(i for i, (_, names) in enumerate(LAYERS) if top in names)


def test_every_module_has_a_layer():
    for n in MODULES:
        if n not in OUTSIDE:
            layer_of(n)       # StopIteration: a new module docs/ARCHITECTURE.md does not place


def test_modules_only_import_downward():
    upward = sorted(f"{n} ({LAYERS[layer_of(n)][0]}) -> {t} ({LAYERS[layer_of(t)][0]})"
                    for n, deps in graph().items() if n not in OUTSIDE
                    for t in deps if t not in OUTSIDE and layer_of(t) > layer_of(n))
    assert not upward, upward


def test_each_job_has_a_package_of_its_own():
    for pkg in ("pytriatt.cli", "pytriatt.benchmark", "pytriatt.evaluation", "pytriatt.testing"):
        assert pkg in MODULES and MODULES[pkg].name == "__init__.py", pkg
    for task in ("nll", "passkey", "agree", "dfs", "recall"):
        assert f"pytriatt.evaluation.{task}" in MODULES


def test_core_is_a_facade_over_the_algorithm_modules():
    # pytriatt.core keeps its public names; what it re-exports is defined in rope, calibration, selection...
    import importlib
    tree = ast.parse(MODULES["pytriatt.core"].read_text())
    assert not [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    import pytriatt.core as core
    homes = ("pytriatt.rope", "pytriatt.calibration", "pytriatt.selection", "pytriatt.fingerprint",
             "pytriatt.gguf_model", "pytriatt.errors", "pytriatt.policy")
    for name in core.__all__:
        obj = getattr(core, name)
        home = getattr(obj, "__module__", None)
        # functions and classes are defined in an algorithm module; constants are the same objects as there
        assert home in homes if home else any(getattr(importlib.import_module(h), name, None) is obj
                                              for h in homes + ("pytriatt._core",)), name
    assert core.Calibration.__module__ == "pytriatt.calibration" and core.select.__module__ == "pytriatt.selection"


# the modules' former names, deleted (0.1.0 has no outside users): only the new names import
FORMER_NAMES = ("pytriatt.bench", "pytriatt.eval_common", "pytriatt.eval_recall", "pytriatt.eval_tasks",
                "pytriatt.evaluate", "pytriatt.tiny", "pytriatt.synth")


@pytest.mark.parametrize("old", FORMER_NAMES)
def test_the_former_module_names_are_gone(old):
    import importlib
    assert old not in MODULES
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old)


def test_the_moved_modules_import_under_their_new_names():
    import importlib
    for new in ("pytriatt.benchmark", "pytriatt.evaluation.common", "pytriatt.evaluation.recall",
                "pytriatt.evaluation.runner", "pytriatt.evaluation.nll", "pytriatt.evaluation.passkey",
                "pytriatt.evaluation.agree", "pytriatt.evaluation.dfs", "pytriatt.testing.tiny",
                "pytriatt.testing.synth"):
        assert importlib.import_module(new).__name__ == new


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_name_is_imported_from_another_module(name):
    private = [(t, n) for t, names in imports(name) for n in names
               if n.startswith("_") and not n.startswith("__") and t != name]
    assert not private, f"{name} imports private names {private}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_name_of_another_module_is_reached_through_it(name):
    """`from . import core` then `core._reader(...)` is the same breach as importing _reader."""
    tree = ast.parse(MODULES[name].read_text())
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                full = _resolve(name, node)
                mod = f"{full}.{a.name}"
                if mod in MODULES or mod in EXTENSIONS:
                    aliases[a.asname or a.name] = mod
    bad = sorted({f"{aliases[n.value.id]}.{n.attr}" for n in ast.walk(tree)
                  if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases
                  and n.attr.startswith("_") and not n.attr.startswith("__") and aliases[n.value.id] != name})
    assert not bad, f"{name} reaches private names {bad}"

"""The shape of fused_rlvr/train: no import cycle, every module importable on its own, hooks that use only
their StepContext (never the trainer, never another object's private attributes)."""

from __future__ import annotations

import ast
import dataclasses
import os
import subprocess
import sys

import fused_rlvr.train

TRAIN = os.path.dirname(fused_rlvr.train.__file__)
PACKAGE = "fused_rlvr.train"


def _modules() -> dict[str, str]:
    """module name -> file, for every module of fused_rlvr/train."""
    out = {}
    for folder, _, files in os.walk(TRAIN):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), TRAIN)[:-3].replace(os.sep, ".")
                name = PACKAGE if rel == "__init__" else f"{PACKAGE}.{rel.removesuffix('.__init__')}"
                out[name] = os.path.join(folder, f)
    return out


def _imports(path: str, modules: dict[str, str]) -> set[str]:
    """The fused_rlvr.train modules `path` imports anywhere: at the top, in functions, for type checking."""
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            while n and n not in modules:
                n = n.rpartition(".")[0]
            if n.startswith(PACKAGE):
                out.add(n)
    return out


def test_train_has_no_import_cycle():
    """Not even through imports made for type annotations only: every module depends on others one way."""
    modules = _modules()
    graph = {m: _imports(f, modules) - {m} for m, f in modules.items()}
    assert len(graph) > 15 and f"{PACKAGE}.trainer" in graph
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m) :] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_config_choices_name_every_algorithm():
    from fused_rlvr.train.algorithms import ALGORITHMS
    from fused_rlvr.train.config import TrainConfig

    (field,) = [f for f in dataclasses.fields(TrainConfig) if f.name == "algorithm"]
    assert tuple(field.metadata["choices"]) == tuple(ALGORITHMS)


def test_every_train_module_imports_on_its_own():
    code = (
        "import importlib, sys\n"
        "names = sys.argv[1:]\n"
        "for n in names:\n"
        "    for k in [k for k in sys.modules if k.startswith('fused_rlvr.train')]:\n"
        "        del sys.modules[k]\n"
        "    importlib.import_module(n)\n"
        "print('ok', len(names))\n"
    )
    names = sorted(m for m in _modules() if not m.endswith("__main__"))  # (__main__ runs the trainer)
    p = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.startswith("ok"), p.stderr[-3000:]


def _private_uses(path: str) -> list[str]:
    """`x._name` where x is not self / cls (dunder names aside)."""
    out = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                out.append(f"{os.path.basename(path)}:{node.lineno}: {ast.unparse(node)}")
    return out


def test_no_train_module_touches_another_objects_privates():
    found = [u for f in _modules().values() for u in _private_uses(f)]
    assert found == []


def test_hooks_never_see_the_trainer():
    hooks = [f for m, f in _modules().items() if m.startswith(f"{PACKAGE}.hooks")]
    for f in hooks:
        tree = ast.parse(open(f, encoding="utf-8").read())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        args = {a.arg for n in ast.walk(tree) if isinstance(n, ast.arguments) for a in n.args}
        assert "trainer" not in names | args and "Trainer" not in names, f

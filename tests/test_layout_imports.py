"""The package's import graph, read from the source with `ast` (module-level and function-level
imports alike, so a function-local import cannot hide a circle): dependencies point down."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "lighthouse_megatron"
PKG = "lighthouse_megatron"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _is_package(mod: str) -> bool:
    return MODULES[mod].name == "__init__.py"


def _package_of(mod: str) -> str:
    """The package a module belongs to: itself for a package's `__init__`, else its parent."""
    return mod if _is_package(mod) else mod.rsplit(".", 1)[0]


def _resolve(mod: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = _package_of(mod).split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mod: str):
    """(imported module, imported name or None, line) for every import in `mod`."""
    tree = ast.parse(MODULES[mod].read_text(), filename=str(MODULES[mod]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(mod, node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:  # `from pkg import submodule`
                    yield sub, None, node.lineno
                else:
                    yield target, alias.name, node.lineno


def _edges():
    """Package-internal edges: importer -> the deepest package module the import names."""
    edges = {mod: set() for mod in MODULES}
    for mod in MODULES:
        for target, _, _ in _imports(mod):
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target.startswith(PKG) and target != mod:
                edges[mod].add(target)
    return edges


def _cycles(edges) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_walker_sees_function_level_imports_and_relative_forms():
    # The checks below are only as good as the walk: it must see the import inside a function,
    # resolve `from .x import y` and `from . import x`, and find a known circle in a toy graph.
    assert "lighthouse_megatron.attention" in _edges()["lighthouse_megatron"]  # inside __getattr__
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_package_modules():
    assert _cycles(_edges()) == []


@pytest.mark.parametrize("layer", ["lighthouse_megatron.ops", "lighthouse_megatron.parallel",
                                   "lighthouse_megatron.attention"])
def test_fast_path_does_not_import_the_reference(layer):
    found = [f"{mod}:{line}" for mod in MODULES if mod == layer or mod.startswith(layer + ".")
             for target, name, line in _imports(mod)
             if target == f"{PKG}.reference" or (target == PKG and name == "reference")]
    assert found == []


def _package_imports(mod: str) -> set[str]:
    """The package modules `mod` imports (the deepest module each import names)."""
    out = set()
    for target, _, _ in _imports(mod):
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target.startswith(PKG):
            out.add(target)
    return out


def test_reference_builds_on_config_plan_and_twins_only():
    # The oracle must not share code with what it checks beyond the plan type and the twins.
    allowed = {f"{PKG}.config", f"{PKG}.ops", f"{PKG}.ops.plan", f"{PKG}.ops.twins"}
    assert _package_imports(f"{PKG}.reference") <= allowed
    assert _package_imports(f"{PKG}.ops.twins") <= {f"{PKG}.config", f"{PKG}.ops.plan"}


def test_kernel_or_twin_is_chosen_in_one_place():
    choosers = sorted(mod for mod in MODULES for target, name, _ in _imports(mod)
                      if target == f"{PKG}.ops._triton" and name == "use_triton")
    assert choosers == [f"{PKG}.ops.stages"]


def test_reference_loads_no_triton_module():
    """Importing the reference (and running it) loads neither Triton nor a kernel module: a
    fresh interpreter, so that no other test's imports count."""
    code = (
        "import sys, torch\n"
        "from lighthouse_megatron import LighthouseConfig, reference\n"
        "cfg = LighthouseConfig(levels=2, pooling_factor=4, topk=8, tile_topk=4)\n"
        "q, k, v = (torch.randn(1, 96, 2, 8) for _ in range(3))\n"
        "reference.lighthouse_attention_reference(q, k, v, cfg)\n"
        "print(' '.join(m for m in sys.modules if m.split('.')[0] == 'triton'\n"
        "               or m.startswith('lighthouse_megatron.ops.')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=ROOT.parent)
    assert sorted(proc.stdout.split()) == ["lighthouse_megatron.ops.plan", "lighthouse_megatron.ops.twins"]


def test_package_never_imports_benchmarks():
    found = [f"{mod}:{line}" for mod in MODULES for target, _, line in _imports(mod)
             if target == "benchmarks" or target.startswith("benchmarks.")]
    assert found == []


def test_no_private_names_across_packages():
    found = []
    for mod in MODULES:
        here = _package_of(mod)
        for target, name, line in _imports(mod):
            if not target.startswith(PKG):
                continue
            owner = target
            while owner not in MODULES:
                owner = owner.rpartition(".")[0]
            if _package_of(owner) == here:
                continue
            private_module = any(_is_private(part) for part in target.split("."))
            if private_module or (name is not None and _is_private(name)):
                found.append(f"{mod}:{line} imports {target}{'.' + name if name else ''}")
    assert found == []


def _module_level_imports(mod: str) -> set[str]:
    """The modules `mod` imports when it is imported (not inside its functions)."""
    out, todo = set(), list(ast.parse(MODULES[mod].read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            out.add(_resolve(mod, node))
        todo.extend(ast.iter_child_nodes(node))
    return out


def test_settings_import_nothing_heavy_and_nothing_above_them():
    # `lighthouse-megatron CMD --help` imports `settings` only (its checks may import torch or
    # megatron-core inside a function, when they run); the packages that run the commands import
    # `settings`. Light modules it may build on: the Lighthouse settings, the data package
    # (megatron-core inside its functions), the recipe's schedule, the shipped recipes' files.
    light = {f"{PKG}.{m}" for m in ("config", "recipe", "recipes", "data", "data.prepare")}
    settings = [mod for mod in MODULES if mod.startswith(f"{PKG}.settings")]
    heavy = [f"{mod} imports {target}" for mod in settings for target in _module_level_imports(mod)
             if target.split(".")[0] in ("torch", "megatron", "triton", "transformer_engine")]
    above = [f"{mod}:{line} imports {target}" for mod in settings for target, _, line in _imports(mod)
             if target.startswith(PKG) and not target.startswith(f"{PKG}.settings") and target not in light]
    assert (heavy, above) == ([], [])
    # The walk sees a module-level import where there is one.
    assert "argparse" in _module_level_imports(f"{PKG}.settings.train")


def _reachable(start: set[str]) -> set[str]:
    """Every package module that `start` imports, directly or through others (function-level
    imports included: they run when the function does)."""
    edges, seen, todo = _edges(), set(), list(start)
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo.extend(edges[mod])
    return seen - start


def test_training_imports_no_converter_module():
    """The trainer and the converter share the checkpoint format (`checkpoint/`); the trainer never
    loads the converter or the Hugging Face export."""
    training = {mod for mod in MODULES if mod.startswith(f"{PKG}.training")}
    reached = _reachable(training)
    assert sorted(m for m in reached if m.startswith(f"{PKG}.convert")) == []
    assert f"{PKG}.checkpoint.reader" in reached  # the walk does follow the trainer's imports


def test_megatron_layer_imports_no_kernel_module():
    """`megatron/` knows nothing of kernels beyond calling `lighthouse_attention`."""
    found = [f"{mod} imports {target}" for mod in MODULES if mod.startswith(f"{PKG}.megatron.")
             or mod == f"{PKG}.megatron" for target in _package_imports(mod)
             if target == f"{PKG}.ops" or target.startswith(f"{PKG}.ops.")]
    assert found == []

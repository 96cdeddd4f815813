"""benchmarks/ laid out as evidence: one folder per study with its README,
Python only in study packages and the shared helpers, and no function over 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
MAX_LINES = 80


def long_functions(source: str, name: str = "<source>") -> list[str]:
    """The functions (methods and nested ones too) longer than MAX_LINES, decorators included."""
    out = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = node.end_lineno - min([node.lineno, *(d.lineno for d in node.decorator_list)]) + 1
            if lines > MAX_LINES:
                out.append(f"{name}:{node.lineno} {node.name}: {lines} lines")
    return out


def test_no_function_over_80_lines():
    found = [f for path in sorted(BENCHMARKS.rglob("*.py"))
             for f in long_functions(path.read_text(), str(path.relative_to(BENCHMARKS)))]
    assert found == []


def test_the_check_finds_a_long_function():
    def body(n):
        return "\n".join(["    x = 0"] * (n - 1))

    assert long_functions(f"def f():\n{body(MAX_LINES)}\n") == []
    assert long_functions(f"class C:\n  def g(self):\n{body(MAX_LINES + 1)}\n") == ["<source>:2 g: 81 lines"]


def test_every_study_is_a_folder_with_its_readme():
    assert sorted(p.name for p in BENCHMARKS.glob("*.py")) == ["__init__.py", "_common.py"]
    studies = [d for d in BENCHMARKS.iterdir() if d.is_dir() and not d.name.startswith(("_", "."))]
    assert studies
    for d in studies:
        assert (d / "README.md").is_file(), f"{d.name}/ has no README.md"
        if any(d.glob("*.py")):
            assert (d / "__init__.py").is_file(), f"{d.name}/ holds Python but is no package"

"""The house rules of the product folders (issue #19): no module over ~400 lines, no function over 60 lines of code.

Counted with the standard library's ``ast``: a function's length is its body's non-blank, non-comment lines after
the docstring; nested functions count on their own (and inside their parent, as a reader reads them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "r4b_fast"
MAX_FILE_LINES = 420  # "~400"
MAX_FUNCTION_LINES = 60
MODULES = sorted(PACKAGE.rglob("*.py"))


def function_lengths(source: str) -> dict[str, int]:
    """``{qualified name: code lines}`` of every function in ``source``."""
    lines = source.splitlines()
    out: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = child.body
                if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                        and isinstance(body[0].value.value, str):  # fmt: skip
                    body = body[1:]
                text = lines[body[0].lineno - 1:child.end_lineno] if body else []
                out[prefix + child.name] = sum(1 for t in text if t.strip() and not t.strip().startswith("#"))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(source), "")
    return out


def test_the_counter_counts_code_lines_only():
    src = 'def f(x):\n    """doc\n    more doc"""\n    # a comment\n\n    y = x\n    return y\n\nclass C:\n' \
          '    def g(self):\n        def h():\n            return 1\n        return h()\n'  # fmt: skip
    assert function_lengths(src) == {"f": 2, "C.g": 3, "C.g.h": 1}


def test_modules_were_found():
    assert len(MODULES) > 40 and PACKAGE / "__init__.py" in MODULES


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_is_short_and_its_functions_are_short(path):
    source = path.read_text(encoding="utf-8")
    n = source.count("\n")
    assert n <= MAX_FILE_LINES, f"{path.relative_to(PACKAGE)} has {n} lines (at most {MAX_FILE_LINES}): split it"
    long = {name: k for name, k in function_lengths(source).items() if k > MAX_FUNCTION_LINES}
    assert not long, f"{path.relative_to(PACKAGE)}: functions over {MAX_FUNCTION_LINES} lines of code: {long}"

"""The suite's own rules, checked on its source: assertions must be able to fail.

Read with ``ast`` (nothing is imported or run). Each rule matches one exact shape:

* ``assert a or b`` — an either-way assertion passes whichever way the code behaves;
* ``assert x == x`` — an expression compared with itself;
* ``assert all(... for v in xs)`` where nothing asserts that ``xs`` is non-empty — ``all`` of
  nothing is True. Accepted evidence, in the same test before the ``all`` (or as an earlier
  operand of the same ``and``): ``assert xs``, or a comparison involving ``len(xs)`` or
  ``xs.num_rows``, where ``xs`` may also be a name assigned from an expression that mentions it
  (``reasons = [q["reason"] for q in build.quarantine]`` then ``assert reasons``). ``all`` over
  a literal or ``range(...)`` is accepted as is;
* a test function with no assertion at all (no ``assert``, ``pytest.raises``/``warns``, nor a
  call whose name contains ``assert``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# Known offenders in files another change is fixing, as "path::function: rule". An entry that no
# longer matches fails the test too: delete it when its test is fixed.
KNOWN: set[str] = set()

_WRAPPERS = {"list", "set", "sorted", "tuple", "len", "enumerate", "reversed", "dict", "iter"}
_METHODS = {"items", "values", "keys", "to_pylist", "tolist", "column", "iterdir", "glob", "rglob"}


def _base(node: ast.expr) -> ast.expr:
    """What an iteration really walks: ``sorted(x.items())`` → ``x``."""
    while True:
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _WRAPPERS
            and node.args
        ):
            node = node.args[0]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in _METHODS
        ):
            node = node.func.value
        else:
            return node


def _is_literal(node: ast.expr) -> bool:
    node = _base(node)
    if isinstance(node, ast.List | ast.Tuple | ast.Set | ast.Dict | ast.Constant):
        return True
    return isinstance(node, ast.Call) and ast.unparse(node.func) == "range"


def _and_parts(test: ast.expr) -> list[ast.expr]:
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
        return list(test.values)
    return [test]


def _says_non_empty(parts: list[ast.expr], names: set[str]) -> bool:
    """Whether one of ``parts`` asserts that an expression named in ``names`` is non-empty."""
    for part in parts:
        if ast.unparse(_base(part)) in names:
            return True
        if isinstance(part, ast.Compare):
            for side in (part.left, *part.comparators):
                if (
                    isinstance(side, ast.Call)
                    and ast.unparse(side.func) == "len"
                    and side.args
                    and ast.unparse(_base(side.args[0])) in names
                ):
                    return True
                if (
                    isinstance(side, ast.Attribute)
                    and side.attr == "num_rows"
                    and ast.unparse(side.value) in names
                ):
                    return True
    return False


def _vacuous_alls(function: ast.FunctionDef) -> Iterator[str]:
    asserts = [n for n in ast.walk(function) if isinstance(n, ast.Assert)]
    assigns = [n for n in ast.walk(function) if isinstance(n, ast.Assign | ast.AnnAssign)]
    for statement in asserts:
        parts = _and_parts(statement.test)
        for index, part in enumerate(parts):
            if not (
                isinstance(part, ast.Call)
                and ast.unparse(part.func) == "all"
                and part.args
                and isinstance(part.args[0], ast.GeneratorExp | ast.ListComp)
            ):
                continue
            iterated = part.args[0].generators[0].iter
            if _is_literal(iterated):
                continue
            text = ast.unparse(_base(iterated))
            names = {text}
            for assign in assigns:
                targets = assign.targets if isinstance(assign, ast.Assign) else [assign.target]
                if assign.value is not None and text in ast.unparse(assign.value):
                    names |= {t.id for t in targets if isinstance(t, ast.Name)}
            earlier = [a for a in asserts if a.lineno < statement.lineno]
            if not _says_non_empty(parts[:index], names) and not any(
                _says_non_empty(_and_parts(a.test), names) for a in earlier
            ):
                yield f"line {statement.lineno}: all(...) over {text} never asserted non-empty"


def _asserts_something(function: ast.FunctionDef) -> bool:
    for node in ast.walk(function):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if "assert" in name or name.endswith((".raises", ".warns")):
                return True
    return False


def problems(source: str) -> dict[str, list[str]]:
    """``"function: rule"`` → what is wrong, for every weak assertion in ``source``."""
    found: dict[str, list[str]] = {}
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, ast.FunctionDef):
            continue
        for statement in ast.walk(function):
            if not isinstance(statement, ast.Assert):
                continue
            test = statement.test
            if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.Or):
                found.setdefault(f"{function.name}: or", []).append(
                    f"line {statement.lineno}: either-way `or` assertion"
                )
            if (
                isinstance(test, ast.Compare)
                and len(test.comparators) == 1
                and ast.dump(test.left) == ast.dump(test.comparators[0])
            ):
                found.setdefault(f"{function.name}: self", []).append(
                    f"line {statement.lineno}: compares an expression with itself"
                )
        vacuous = list(_vacuous_alls(function))
        if vacuous:
            found[f"{function.name}: all"] = vacuous
        if function.name.startswith("test_") and not _asserts_something(function):
            found[f"{function.name}: nothing"] = [f"line {function.lineno}: asserts nothing"]
    return found


def _suite() -> dict[str, list[str]]:
    found = {}
    for path in sorted(TESTS.rglob("*.py")):
        relative = path.relative_to(TESTS).as_posix()
        for key, lines in problems(path.read_text()).items():
            found[f"{relative}::{key}"] = lines
    return found


def test_no_assertion_in_the_suite_is_unable_to_fail() -> None:
    found = _suite()
    new = {key: lines for key, lines in found.items() if key not in KNOWN}
    assert new == {}, "assertions that cannot fail (see this file's docstring for the rules)"
    fixed = sorted(KNOWN - set(found))
    assert fixed == [], "fixed: delete these entries from KNOWN"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def test_a(x):\n    assert x <= 1 or 1 <= x\n", ["test_a: or"]),
        ("def test_a(q):\n    assert q('a') == q('a')\n", ["test_a: self"]),
        ("def test_a(xs):\n    assert all(x > 0 for x in xs)\n", ["test_a: all"]),
        ("def test_a(r):\n    assert all(x for x in r.items())\n", ["test_a: all"]),
        ("def test_a(xs):\n    xs.sort()\n", ["test_a: nothing"]),
        ("def test_a(xs):\n    assert xs and all(x > 0 for x in xs)\n", []),
        ("def test_a(xs):\n    assert len(xs) == 3\n    assert all(x for x in xs)\n", []),
        (
            "def test_a(t):\n    assert t.num_rows == 2\n    assert all(x for x in t.column('a'))\n",
            [],
        ),
        (
            "def test_a(b):\n    ys = [q for q in b.qs]\n    assert ys and all(q for q in b.qs)\n",
            [],
        ),
        ("def test_a():\n    assert all(i >= 0 for i in range(3))\n", []),
        ("def test_a(f):\n    with pytest.raises(ValueError):\n        f()\n", []),
        ("def test_a(x, y):\n    assert x == y or x is None\n", ["test_a: or"]),
    ],
)
def test_the_rules_catch_each_shape_and_accept_the_fixes(source: str, expected: list) -> None:
    assert sorted(problems(source)) == expected

"""The verbs transport's shape (issue 25): one post-and-wait engine. Every completion is
taken in one place, which checks its status and its id, and every work request is recorded in
one in-flight table; a verb is its posting plus one call. Read from the source with ``ast``,
so that a sixth copy of the loop fails here, without an RDMA device."""

from __future__ import annotations

import ast

from .conftest import ROOT

SOURCE = ROOT / "pmemblk" / "transport" / "verbs.py"


def _functions() -> list[ast.FunctionDef]:
    tree = ast.parse(SOURCE.read_text(), str(SOURCE))
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]


def _where(found: list[tuple[str, int]]) -> list[str]:
    return [f"{name} (line {line})" for name, line in found]


def _innermost(node: ast.AST, functions: list[ast.FunctionDef]) -> str:
    """The name of the innermost function that holds ``node``."""
    holders = [f for f in functions
               if f.lineno <= getattr(node, "lineno", -1) <= (f.end_lineno or f.lineno)]
    return min(holders, key=lambda f: (f.end_lineno or f.lineno) - f.lineno).name \
        if holders else "<module>"


def test_one_drain_takes_every_completion_and_checks_it() -> None:
    functions = _functions()
    nodes = list(ast.walk(ast.parse(SOURCE.read_text(), str(SOURCE))))
    waits = [n for n in nodes if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr in ("poll", "wait", "poll_cq")]
    statuses = [n for n in nodes if isinstance(n, ast.Compare) and any(
        isinstance(x, ast.Attribute) and x.attr == "status"
        for x in [n.left, *n.comparators])]
    failures = [n for n in nodes if isinstance(n, ast.Call) and (
        (isinstance(n.func, ast.Attribute) and n.func.attr == "wc_failure")
        or (isinstance(n.func, ast.Name) and n.func.id == "wc_failure"))]
    unknown = [n for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str)
               and "unknown work request" in n.value]
    for what, found in (("waits for completions", waits), ("checks a completion's status",
                        statuses), ("makes a completion's error", failures),
                        ("reports an unknown work request", unknown)):
        at = [(_innermost(n, functions), n.lineno) for n in found]
        assert len(at) == 1, f"{len(at)} places {what}: {_where(at)}"
        assert at[0][0] == "_drain", f"the one place that {what} is {_where(at)}, not _drain"


def test_work_requests_are_recorded_in_one_table() -> None:
    """No verb keeps a table of its own: the only dict the module makes is the in-flight
    table, made once per connection."""
    tree = ast.parse(SOURCE.read_text(), str(SOURCE))
    functions = _functions()
    made = [n for n in ast.walk(tree)
            if isinstance(n, (ast.Dict, ast.DictComp))
            or (isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                and n.func.id == "dict")]
    at = [(_innermost(n, functions), n.lineno) for n in made]
    assert len(at) == 1 and at[0][0] == "__init__", f"dicts made in {_where(at)}"
    targets = [t for n in ast.walk(tree) if isinstance(n, ast.AnnAssign) and n.value is made[0]
               for t in [n.target]]
    assert [ast.unparse(t) for t in targets] == ["self._inflight"]

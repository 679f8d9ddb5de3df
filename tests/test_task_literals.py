"""The task vocabulary lives in one place (configs/tasks.py): no other product module names a task or a
task metric in a string literal, so adding a task is one registry entry."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from configs.tasks import BUILTIN_TASKS, gated_metrics, structured_tasks, task_names

ROOT = Path(__file__).resolve().parents[1]
PRODUCT_DIRS = ("configs", "tasks", "flows", "serving")
REGISTRY = Path("configs/tasks.py")
# The default data sources say which task each shipped dataset feeds: data, as a YAML preset would be,
# not vocabulary the code branches on.
ALLOWED = {(Path("configs/data_schema.py"), "SourceConfig")}


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            ids.add(id(first.value))
    return ids


def _allowed_calls(tree: ast.AST, path: Path) -> set[int]:
    """String constants inside allowed calls (e.g. the default ``SourceConfig(...)`` entries)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and (path, node.func.id) in ALLOWED:
            ids |= {id(c) for c in ast.walk(node) if isinstance(c, ast.Constant)}
    return ids


def task_literals(source: str, path: Path, names: tuple[str, ...]) -> list[tuple[int, str]]:
    """(line, text) of every string literal that is a task name or a ``<task>_<metric>`` name. Docstrings,
    f-string pieces (prose) and allowed calls are skipped."""
    pattern = re.compile(r"(format_compliance_)?(" + "|".join(map(re.escape, names)) + r")(_[A-Za-z0-9_]+)?")
    tree = ast.parse(source)
    skip = _docstrings(tree) | _allowed_calls(tree, path)
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            skip |= {id(v) for v in node.values}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
            and pattern.fullmatch(node.value)]


def test_no_product_module_outside_the_registry_names_a_task():
    found = []
    for folder in PRODUCT_DIRS:
        for file in sorted((ROOT / folder).rglob("*.py")):
            rel = file.relative_to(ROOT)
            if rel == REGISTRY:
                continue
            found += [f"{rel}:{line}: {text!r}" for line, text in task_literals(file.read_text("utf-8"), rel,
                                                                              task_names())]
    assert not found, "task names belong in configs/tasks.py:\n" + "\n".join(found)


def test_the_grep_finds_what_it_looks_for():
    # The check above passes vacuously if the scanner misses literals: show it catches each form.
    source = ('X = ("sentiment", "ner_f1", "format_compliance_ner")\n'
              'def f():\n    """sentiment in a docstring is prose."""\n    return f"{x} summarization"\n'
              'Y = SourceConfig(task="summarization")\n')
    hits = task_literals(source, Path("configs/data_schema.py"), task_names())
    assert [text for _, text in hits] == ["sentiment", "ner_f1", "format_compliance_ner"]
    assert task_literals(source, Path("tasks/other.py"), task_names())[-1][1] == "summarization"


def test_gated_sets_follow_the_registry():
    assert set(structured_tasks()) == {n for n, s in BUILTIN_TASKS.items() if s.output in ("label", "entities")}
    for name, spec in BUILTIN_TASKS.items():
        assert spec.headline_metric in gated_metrics()
        assert (f"{name}_macro_f1" in gated_metrics()) == (spec.output == "label")

"""The store owns the SQL and the state machine: checked by reading the package's source (AST), not by hope."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tokenmill"
STORE = PACKAGE / "store"
# kombu's SQL transport (the embedded broker) is built on SQLAlchemy: celery_app.py creates its tables
# and tells its integrity races apart, which needs SQLAlchemy's own names. config.py only rewrites URL
# strings (no import), so it is not an exception.
SQLALCHEMY_ALLOWED = {PACKAGE / "celery_app.py"}
STATE_ATTRIBUTES = {"state", "status"}


def _sources() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(encoding="utf-8"), filename=str(p))) for p in sorted(PACKAGE.rglob("*.py"))]


def _outside_store(path: Path) -> bool:
    return STORE not in path.parents


def sqlalchemy_imports(tree: ast.Module) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            lines += [node.lineno for a in node.names if a.name.split(".")[0] == "sqlalchemy"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sqlalchemy":
            lines.append(node.lineno)
    return lines


def state_writes(tree: ast.Module) -> list[int]:
    """Lines that assign to ``<anything>.state`` / ``.status`` (a write of a state, whatever the value)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        else:
            continue
        for target in targets:
            for t in ast.walk(target):
                if isinstance(t, ast.Attribute) and t.attr in STATE_ATTRIBUTES and isinstance(t.ctx, ast.Store):
                    lines.append(node.lineno)
    return lines


def test_sqlalchemy_is_imported_only_in_the_store() -> None:
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line}"
        for path, tree in _sources()
        if _outside_store(path) and path not in SQLALCHEMY_ALLOWED
        for line in sqlalchemy_imports(tree)
    ]
    assert found == [], "SQL belongs in tokenmill/store/; move these queries there:\n" + "\n".join(found)


def test_states_are_written_only_in_the_store() -> None:
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line}"
        for path, tree in _sources()
        if _outside_store(path)
        for line in state_writes(tree)
    ]
    assert found == [], "state transitions belong in tokenmill/store/; call a store function:\n" + "\n".join(found)


def test_the_checks_see_what_they_look_for() -> None:
    """The walkers find the patterns (else the two tests above would pass on anything)."""
    tree = ast.parse(
        "import sqlalchemy\nfrom sqlalchemy.orm import Session\n"
        "job.state = 'running'\nr.status: str = 'failed'\nself.job.state = JobState.RUNNING\n"
        "x = job.state\napp.state.settings = 1\n"
    )
    assert sqlalchemy_imports(tree) == [1, 2]
    assert state_writes(tree) == [3, 4, 5]
    store_trees = [tree for path, tree in _sources() if not _outside_store(path)]
    assert any(state_writes(t) for t in store_trees)  # the store does write states: the walk reaches it

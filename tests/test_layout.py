"""The layout's import rules, checked on the source (ast, nothing is executed).

pipelines -> mermed -> ingest's contract (schema, storage, config, progress); pipelines -> ingest; ingest imports
neither mermed nor pipelines; mermed never imports pipelines; bench/ and tests/ import public names only; every
name imported from a project module is defined there; and no import cycle between the project's modules. Imports
under ``if __name__ == "__main__":`` are what a script does when run by path, not a dependency of the module, and
are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
PACKAGES = ("ingest", "mermed", "pipelines")
INGEST_CONTRACT = ("ingest.schema", "ingest.storage", "ingest.config", "ingest.progress")


def _is_main_guard(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def _imports(tree: ast.AST, module: str):
    """(imported module, imported names, line) for every import outside a ``__main__`` guard."""
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if _is_main_guard(child):
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, (), child.lineno
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    parent = module.split(".")[: -child.level]
                    base = ".".join([*parent, base] if base else parent)
                yield base, tuple(a.name for a in child.names), child.lineno
            stack.append(child)


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _ours(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _top_level_names(tree: ast.Module) -> set[str]:
    """Names a module defines at its top level (also inside top-level ``if`` and ``try`` blocks)."""
    names: set[str] = set()
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.If, ast.Try)):
            stack += [*node.body, *node.orelse, *getattr(node, "finalbody", []), *getattr(node, "handlers", [])]
        elif isinstance(node, ast.ExceptHandler):
            stack += node.body
    return names


def _missing_names(root: Path, target: str, names: tuple[str, ...]) -> list[str] | None:
    """The ``names`` module ``target`` of the tree at ``root`` neither defines nor has as submodules; None when
    there is no such module."""
    base = root.joinpath(*target.split("."))
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    if not path.is_file():
        return None
    defined = _top_level_names(ast.parse(path.read_text(), str(path)))
    return [n for n in names if n not in defined and not (base / f"{n}.py").is_file() and not (base / n).is_dir()]


def layout_violations(root: Path) -> list[str]:
    """Every broken rule in the tree at ``root``, as 'file:line: what'."""
    problems = []
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] not in (*PACKAGES, "bench", "tests") or ".venv" in rel.parts:
            continue
        module = _module_name(root, path)
        top = rel.parts[0]
        for target, names, line in _imports(ast.parse(path.read_text(), str(rel)), module):
            if not _ours(target):
                continue
            where = f"{rel}:{line}: imports {target}"
            head = target.split(".")[0]
            missing = _missing_names(root, target, names)
            if missing is None:
                problems.append(f"{where} (no such module)")
            elif missing:
                problems.append(f"{where} (not defined there: {', '.join(missing)})")
            if top == "ingest" and head in ("mermed", "pipelines"):
                problems.append(f"{where} (ingest imports neither mermed nor pipelines)")
            if top == "mermed" and head == "pipelines":
                problems.append(f"{where} (mermed never imports pipelines)")
            if (
                top == "mermed"
                and head == "ingest"
                and not any(
                    target == c or (target == "ingest" and all(f"ingest.{n}" in INGEST_CONTRACT for n in names))
                    for c in INGEST_CONTRACT
                )
            ):
                problems.append(f"{where} (mermed uses only ingest's contract: {', '.join(INGEST_CONTRACT)})")
            if top in ("bench", "tests"):
                private = [n for n in names if n.startswith("_")] + [p for p in target.split(".") if p[:1] == "_"]
                if private and not target.endswith("__future__"):
                    problems.append(f"{where} (private name {', '.join(private)} from outside its package)")
            if top in PACKAGES:
                graph.setdefault(module, set()).add(target)
                graph[module].update(f"{target}.{n}" for n in names)
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles among the graph's own modules (depth-first search; one cycle per back edge)."""
    edges = {m: sorted(t for t in targets if t in graph and t != m) for m, targets in graph.items()}
    state: dict[str, int] = {}
    path: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_the_repository_keeps_its_layout():
    assert layout_violations(REPOSITORY) == []


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # round one's cycles: the command line in mermed importing the entry points, and back
        (
            {
                "mermed/__init__.py": "",
                "mermed/cli.py": "def probe():\n    from pipelines.probe import run_probe\n",
                "pipelines/__init__.py": "",
                "pipelines/probe.py": "from mermed.cli import app\n",
            },
            ["mermed/cli.py:2: imports pipelines.probe (mermed never imports pipelines)", "import cycle"],
        ),
        # ingest depending on the model package for its config and storage
        (
            {"ingest/__init__.py": "", "ingest/npz.py": "from mermed.config import IngestConfig\n"},
            ["ingest/npz.py:1: imports mermed.config (ingest imports neither mermed nor pipelines)"],
        ),
        # mermed reaching past the contract into the readers
        (
            {"mermed/__init__.py": "", "mermed/data.py": "from ingest.pipeline import run_ingest\n"},
            ["mermed/data.py:1: imports ingest.pipeline (mermed uses only ingest's contract"],
        ),
        # a benchmark importing a script's internals
        (
            {"bench/probe.py": "from pipelines.probe import _actor_pool\n"},
            ["bench/probe.py:1: imports pipelines.probe (private name _actor_pool"],
        ),
        # a benchmark importing a name from where it used to live (bench/ingest.py after the layout change)
        (
            {
                "mermed/__init__.py": "",
                "mermed/config.py": "class PretrainConfig: ...\n",
                "bench/ingest.py": "from mermed.config import IngestConfig, PretrainConfig\n",
            },
            ["bench/ingest.py:1: imports mermed.config (not defined there: IngestConfig)"],
        ),
    ],
)
def test_each_old_violation_is_caught(tmp_path, files, expected):
    problems = layout_violations(_write(tmp_path, files))
    for want in expected:
        assert any(want in p for p in problems), (want, problems)


def test_a_script_guard_is_not_a_dependency(tmp_path):
    files = {
        "pipelines/__init__.py": "",
        "pipelines/cli.py": "def run():\n    from pipelines.pretrain import run_pretrain\n",
        "pipelines/pretrain.py": (
            'def run_pretrain(): ...\nif __name__ == "__main__":\n    from pipelines.cli import run\n'
        ),
    }
    assert layout_violations(_write(tmp_path, files)) == []

"""The package's shape (issue 17): imports flow one way, functions stay readable, commands stay thin."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gptcli"
MAX_LINES = 100


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in PACKAGE.rglob("*.py")}


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Every gptcli module ``name`` imports, at the top or deferred inside a function (a circle either way)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def test_the_import_graph_has_no_circle():
    modules = _modules()
    graph = {name: _imports(name, tree, set(modules)) for name, tree in modules.items()}
    # A package's __init__ re-exporting its modules is not a circle of its own.
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import circle: " + " -> ".join(path[path.index(nxt):] + [nxt])
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_no_library_function_is_longer_than_100_lines():
    long = []
    for name, tree in _modules().items():
        if name.startswith("gptcli.commands"):
            continue  # Typer commands declare every option in their signature
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


def test_commands_do_not_build_models_or_runs_themselves():
    """Loading and run assembly live in the library: commands call gptcli.runtime / gptcli.training."""
    for name, tree in _modules().items():
        if not name.startswith("gptcli.commands"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("gptcli.weights", "gptcli.model.gpt"):
                imported = {a.name for a in node.names}
                assert not imported & {"load_model", "GPTModel", "build_model", "random_model"}, (name, imported)


def test_the_model_file_stays_the_books():
    """gptcli/model/gpt.py: the maths only. Speed is applied from outside (Linear swaps, attention functions
    passed in), so it imports no kernel, decoding or serving module, never asks whether it is being
    compiled, has one attention call site and stays short (issue 26)."""
    source = (PACKAGE / "model" / "gpt.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    imported = _imports("gptcli.model.gpt", tree, set(_modules()))
    assert imported <= {"gptcli.config", "gptcli.model.kv_cache"}, imported
    assert "is_compiling" not in source and "onednn" not in source.split('"""', 2)[2]
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id == "attend"]
    assert len(calls) == 1, "MultiHeadAttention.forward calls its attention function once"
    assert len(source.splitlines()) <= 250
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"GPTModel", "TransformerBlock", "MultiHeadAttention", "FeedForward", "LayerNorm", "GELU"} <= classes


FOLDERS = ("model", "kernels", "decoding", "serving", "training", "commands")


def _unit(name: str) -> str:
    """A folder's modules count as one unit; a module at the top is a unit of its own."""
    parts = name.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in FOLDERS else name


def test_folders_import_one_way():
    """Folders by concern (issue 26): no import runs back up, so the folders and the modules at the top
    form no circle either (a folder's modules taken together)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, tree in modules.items():
        graph.setdefault(_unit(name), set()).update(_unit(t) for t in _imports(name, tree, set(modules)))
    for unit in graph:
        graph[unit].discard(unit)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, "folder-level circle: " + " -> ".join(path[path.index(nxt):] + [node, nxt])
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for unit in sorted(graph):
        if unit not in state:
            visit(unit, [])


def test_what_each_folder_may_import():
    """The model imports no kernels, decoding or serving; kernels no decoding or serving; decoding no
    serving or training; nothing but the CLI imports commands."""
    forbidden = {"model": {"kernels", "decoding", "serving", "training", "commands"},
                 "kernels": {"decoding", "serving", "training", "commands"},
                 "decoding": {"serving", "training", "commands"},
                 "serving": {"commands", "training"},
                 "training": {"serving", "commands"}}
    modules = _modules()
    wrong = []
    for name, tree in modules.items():
        unit = _unit(name)
        for target in _imports(name, tree, set(modules)):
            if _unit(target) in forbidden.get(unit, set()) or (_unit(target) == "commands" and unit not in
                                                                ("commands", "gptcli.cli")):
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_new_folders_have_empty_inits():
    """``params``, ``tokenize`` and ``--help`` import these folders' names without torch: their __init__ holds
    a docstring only."""
    for folder in ("model", "kernels", "decoding", "serving"):
        tree = ast.parse((PACKAGE / folder / "__init__.py").read_text(encoding="utf-8"))
        assert len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr), folder


def test_every_decode_loop_keeps_its_rows_in_one_sequence_state():
    """A sequence's generator and continuation are made in one place, SequenceState (issue 26): plain,
    speculative, --each-line and the server's rows all decode through it."""
    made = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id in ("make_generator", "Continuation"):
                made.append((name, node.func.id))
    assert sorted(made) == [("gptcli.decoding.generate", "Continuation"), ("gptcli.decoding.generate", "make_generator")]
    source = (PACKAGE / "decoding" / "generate.py").read_text(encoding="utf-8")
    state = source[source.index("class SequenceState"):source.index("class Generation")]
    assert "make_generator(" in state and "Continuation(" in state

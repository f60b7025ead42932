"""The structure shows the architecture: imports run one way (no circle, function-level imports included), and
no source file grows past what a reader takes in at once."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: str = "svdtrain") -> dict[str, set[str]]:
    """{module: the package's modules it imports}, from every import statement in it, at any depth."""
    modules = {_module_name(p): p for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                    base = f"{anchor}.{base}" if base else anchor
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each once, as the path that closes it (depth-first search)."""
    found, state = [], {}

    def visit(node: str, path: list[str]):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_cycles_finds_a_circle_through_a_function_level_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_the_library_or_the_tool():
    graph = import_graph()
    assert {"svdtrain.prune", "svdtrain.export", "svdtrain.recipes.pipeline"} <= set(graph)
    assert "svdtrain.forms" in graph["svdtrain.export"] and "svdtrain.forms" in graph["svdtrain.prune"]
    assert cycles(graph) == []


def test_no_source_file_over_500_lines():
    sources = [*(ROOT / "svdtrain").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    assert len(sources) > 20
    long = {str(p.relative_to(ROOT)): n for p in sources if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}

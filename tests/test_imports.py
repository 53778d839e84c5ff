"""The package's import graph: no circles (a module reached again through its own imports
half-initialised is the classic source of ImportErrors that depend on which module a user
imports first), and the library never imports the training code that stands beside it
(alip.training uses alip, as open_clip_train uses open_clip, never the other way)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "alip"


def module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path):
    """Every alip module ``path`` imports, at the top or inside a function (a lazy import still
    closes a circle at the moment it runs)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "alip"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "alip":
                target = node.module
            else:
                continue
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}  # `from . import text_views`
    return found


def graph():
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: sorted(t for t in imports_of(path) if t in modules and t != name)
            for name, path in modules.items()}


def cycles(edges):
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]


def test_no_import_circles():
    edges = graph()
    # a package's __init__ re-exporting its modules is not a circle of behaviour
    edges = {m: [t for t in ts if not (m.startswith(t + ".") and (PACKAGE / t.replace(
        "alip.", "", 1).replace(".", "/")).is_dir())] for m, ts in edges.items()}
    assert cycles(edges) == []


def test_library_never_imports_training():
    bad = {m: [t for t in ts if t.startswith("alip.training")] for m, ts in graph().items()
           if not m.startswith("alip.training")}
    assert {m: ts for m, ts in bad.items() if ts} == {}


def test_training_functions_stay_short():
    """The training code reads as named phases: no function in alip/training over 80 lines (a
    long one is a phase that wants a name)."""
    long = []
    for path in sorted((PACKAGE / "training").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{path.name}:{node.name} ({n} lines)")
    assert long == []

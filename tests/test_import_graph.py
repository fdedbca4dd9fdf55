"""No two modules of resim_d2 import each other, directly or through others.

The graph is read from the source with :mod:`ast` (nothing is imported): an edge ``a -> b`` for
every ``import``/``from ... import`` of a resim_d2 module anywhere in ``a`` (module level, in
functions and under ``if TYPE_CHECKING``), relative imports resolved against ``a``'s package. An
``from .pkg import name`` is an edge to ``pkg.name`` when that is a module, else to the package
``pkg``. A package's ``__init__`` counts like any module, so a re-export closes a cycle only where
the package's modules also import the package back. A cycle is a strongly connected component of
more than one module (Tarjan's algorithm), printed with one path around it.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "resim_d2")
PACKAGE = "resim_d2"


def module_files(root=ROOT, package=PACKAGE):
    """{dotted module name: file path} of every .py file under ``root``."""
    out = {}
    for folder, _, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        parts = [package] + ([] if rel == "." else rel.split(os.sep))
        for f in files:
            if f.endswith(".py"):
                name = parts if f == "__init__.py" else parts + [f[:-3]]
                out[".".join(name)] = os.path.join(folder, f)
    return out


def import_graph(files):
    """{module: set of modules of ``files`` it imports}."""
    graph = {m: set() for m in files}
    for mod, path in files.items():
        is_package = path.endswith("__init__.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".")
                    base = base[: len(base) - node.level + (1 if is_package else 0)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                targets = []
                for alias in node.names:
                    sub = f"{stem}.{alias.name}"
                    targets.append(sub if sub in files else stem)
            else:
                continue
            for t in targets:
                while t and t not in files and "." in t:  # `import a.b.c` of a name inside a.b
                    t = t.rsplit(".", 1)[0]
                if t in files and t != mod:
                    graph[mod].add(t)
    return graph


def strongly_connected(graph):
    """Tarjan's algorithm: the components of ``graph`` (iterative, no recursion limit)."""
    index, low, on_stack, stack, comps = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                comps.append(sorted(comp))
    return comps


def a_cycle(graph, comp):
    """One closed path through the component's first module (breadth-first, shortest)."""
    members, start = set(comp), comp[0]
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return list(reversed(path)) + [start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def cycles(graph):
    return [c for c in strongly_connected(graph) if len(c) > 1]


def test_resim_d2_has_no_import_cycle():
    graph = import_graph(module_files())
    found = cycles(graph)
    report = "\n".join(" -> ".join(a_cycle(graph, c)) for c in found)
    assert not found, f"import cycles in resim_d2:\n{report}"


# ------------------------------------------------------------------- the checker on known graphs
def write_package(root, sources):
    for rel, text in sources.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return module_files(str(root / "pkg"), "pkg")


def test_reads_every_kind_of_import(tmp_path):
    files = write_package(
        tmp_path,
        {
            "pkg/__init__.py": "from .a import f\n",
            "pkg/a.py": "import os\nfrom . import b\n",
            "pkg/b.py": "def g():\n    from .sub.c import h\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/c.py": "from ..a import f\nfrom .. import b\nimport pkg.sub\n",
            "pkg/d.py": "import pkg.sub.c as c\nfrom pkg import a\n",
        },
    )
    assert import_graph(files) == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.sub.c"},
        "pkg.sub": set(),
        "pkg.sub.c": {"pkg.a", "pkg.b", "pkg.sub"},
        "pkg.d": {"pkg.sub.c", "pkg.a"},
    }


@pytest.mark.parametrize(
    "edges,expected",
    [
        ({"a": "b", "b": "c", "c": ""}, []),
        ({"a": "b", "b": "a", "c": "a"}, [["a", "b"]]),
        ({"a": "b", "b": "c", "c": "a", "d": "e", "e": "d"}, [["a", "b", "c"], ["d", "e"]]),
        ({"a": "bc", "b": "c", "c": "b"}, [["b", "c"]]),
    ],
)
def test_finds_exactly_the_cycles_of_known_graphs(edges, expected):
    graph = {v: set(ws) for v, ws in edges.items()}
    assert sorted(cycles(graph)) == expected
    for comp in expected:
        path = a_cycle(graph, comp)
        assert path[0] == path[-1] and set(path) == set(comp)
        assert all(w in graph[v] for v, w in zip(path, path[1:]))


def test_a_function_level_import_cycle_fails_with_its_path(tmp_path):
    files = write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/x.py": "from .y import Y\n",
            "pkg/y.py": "class Y:\n    def f(self):\n        from .x import X\n",
        },
    )
    graph = import_graph(files)
    assert cycles(graph) == [["pkg.x", "pkg.y"]]
    assert a_cycle(graph, ["pkg.x", "pkg.y"]) == ["pkg.x", "pkg.y", "pkg.x"]

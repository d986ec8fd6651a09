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


def _private_access(trees: dict[Path, ast.AST]) -> list[str]:
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
    return problems


def _deepspeed_imports(trees: dict[Path, ast.AST]) -> list[str]:
    problems = []
    for p, t in trees.items():
        if p.relative_to(ROOT).as_posix() == DEEPSPEED_MODULE:
            continue
        for node in ast.walk(t):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for n in names:
                if n == "deepspeed" or n.startswith("deepspeed."):
                    problems.append(f"{p.relative_to(ROOT.parent)}:{node.lineno}: imports {n}")
    return problems


def test_no_private_access_across_packages():
    problems = _private_access(_sources())
    assert not problems, "cross-package private access:\n" + "\n".join(problems)


def test_deepspeed_is_imported_only_by_its_integration_module():
    problems = _deepspeed_imports(_sources())
    assert not problems, f"only rest_ds/{DEEPSPEED_MODULE} may import DeepSpeed:\n" + "\n".join(problems)


def test_the_checks_flag_a_violation():
    """Not vacuous: a module written to break the rules, added to the real sources, is flagged."""
    trees = _sources()
    assert len(trees) > 50 and all(trees.values())
    trees[ROOT / "train" / "bad.py"] = ast.parse(
        "from ..spim.rng import _tls\nfrom rest_ds.data.scene import _helper\nimport deepspeed.comm\n"
        "state = model._spim_rng\nkeep = self._own\nc = torch._C\n")
    trees[ROOT / "train" / "good.py"] = ast.parse("from ..spim import from_local\nfrom .engine import _free_port\n")
    assert _private_access(trees) == ["rest_ds/train/bad.py:1: imports _tls from rest_ds.spim",
                                      "rest_ds/train/bad.py:2: imports _helper from rest_ds.data",
                                      "rest_ds/train/bad.py:4: ._spim_rng is private to rest_ds.spim"]
    assert _deepspeed_imports(trees) == ["rest_ds/train/bad.py:3: imports deepspeed.comm"]

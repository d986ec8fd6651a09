"""Rules of the test suite itself (README, the test tiers paragraph): shared
helpers live in helper modules (tests/harness.py, nets.py, rasters.py,
train_scene.py, zoo_models.py, conftest.py), never in a test module, and are
written once."""
from __future__ import annotations

import ast
from pathlib import Path

HERE = Path(__file__).resolve().parent
ONCE = {"TOL", "TOL32", "TOL64", "free_port", "launch", "rest_ds", "read_csv", "expected_check_names",
        "zero_reference", "make_scene", "tiny_config", "write_config"}


def _modules():
    return sorted(HERE.glob("test_*.py"))


def test_no_test_module_imports_another():
    bad = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                mod = ("." * node.level) + (node.module or "")
                names = [a.name for a in node.names]
                if mod.startswith(("tests.test_", ".test_")) or mod in ("tests", ".") and any(
                        n.startswith("test_") for n in names):
                    bad.append(f"{path.name}:{node.lineno} from {mod} import {', '.join(names)}")
            elif isinstance(node, ast.Import):
                bad += [f"{path.name}:{node.lineno} import {a.name}" for a in node.names if a.name.startswith("tests.test_")]
    assert not bad, "import shared helpers from tests/harness.py & co., not from a test module: " + "; ".join(bad)


def test_shared_helpers_are_not_redefined_in_test_modules():
    bad = []
    for path in _modules():
        for node in ast.parse(path.read_text(), str(path)).body:  # module level only
            targets = []
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                targets = [node.name]
            elif isinstance(node, ast.Assign):
                targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
            bad += [f"{path.name}:{node.lineno} {n}" for n in targets if n in ONCE]
    assert not bad, "defined in tests/harness.py or tests/train_scene.py; import it: " + "; ".join(bad)


def test_the_rules_see_a_violation(tmp_path, monkeypatch):
    # the checks above would fail on a module that breaks them (they are not vacuous)
    bad = tmp_path / "test_bad.py"
    bad.write_text("from tests.test_spim_layers import CASES\nfrom .test_x import y\nTOL = 1e-5\n"
                   "def free_port():\n    return 0\n")
    monkeypatch.setattr(f"{__name__}.HERE", tmp_path)
    for check in (test_no_test_module_imports_another, test_shared_helpers_are_not_redefined_in_test_modules):
        try:
            check()
        except AssertionError as e:
            assert "test_bad.py" in str(e)
        else:
            raise AssertionError(f"{check.__name__} passed on a module that breaks it")

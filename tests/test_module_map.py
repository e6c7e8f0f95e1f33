"""tests/module_map.py: tests/README.md maps every module to its tests and cannot go stale."""

from __future__ import annotations

from pathlib import Path

from tests.module_map import OUTPUT, modules, render, tested_by


def test_tests_readme_is_the_generated_map():
    """Added a module or a test file? Run python -m tests.module_map."""
    assert OUTPUT.read_text() == render(), "tests/README.md is stale: python -m tests.module_map"


def test_every_module_of_the_four_packages_has_a_row():
    text = OUTPUT.read_text()
    for module in modules():
        assert f"| `{module}` |" in text, module


def _tree(root: Path) -> Path:
    for package in ("fedllm", "server", "clients", "simulations"):
        (root / package).mkdir()
        (root / package / "__init__.py").write_text("")
    (root / "tests").mkdir()
    (root / "fedllm" / "ledger.py").write_text("")
    (root / "fedllm" / "new_thing.py").write_text("")
    (root / "server" / "submit.py").write_text("")
    return root


def test_imports_runs_and_patches_by_name_count_and_own_files_come_first(tmp_path):
    root = _tree(tmp_path)
    (root / "tests" / "test_audit.py").write_text("from fedllm import ledger\n")
    (root / "tests" / "test_ledger.py").write_text("import fedllm.ledger as ledger\n")
    (root / "tests" / "test_cli.py").write_text('CMD = ["python", "-m", "server.submit"]\n')
    (root / "tests" / "test_doc.py").write_text('TEXT = """\npython -m server.submit\n"""\n')
    found = tested_by(root)
    assert found["fedllm.ledger"] == ["test_ledger.py", "test_audit.py"]
    assert found["server.submit"] == ["test_cli.py"]  # a multi-line string is text, not a run
    assert found["fedllm.new_thing"] == []
    assert "| `fedllm.new_thing` | none import it directly |" in render(root)

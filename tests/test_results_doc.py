"""simulations/results_doc.py: docs/results.md is what its CSVs and manifest give, and stays so."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from simulations.results_doc import DOCS, MANIFEST, OUTPUT, ManifestError, main, render
from simulations.sweep import RESULT_COLUMNS

HEADER = ",".join(RESULT_COLUMNS[:12])  # point, kind, trainable, ..., wall_seconds
SWEEP_CSV = f"""{HEADER}
federated-eps8-seed0,federated,head,8.0,0,0.90,0.80,0.1,7.99,7.9,8,10
federated-eps8-seed1,federated,head,8.0,1,0.80,0.70,0.1,7.98,7.9,8,30
federated-epsinf-seed0,federated,lora,inf,0,0.95,0.94,0.1,inf,inf,8,100
"""
SITES_CSV = """seed,sites,target-epsilon,test-accuracy
0,100,1.0,0.60
1,100,1.0,0.70
0,100,inf,0.95
0,500,1.0,0.90
"""
MANIFEST_TEXT = """
intro = "# results"

[[table]]
title = "A sweep"
csv = "sweep.csv"
kind = "sweep"
command = "python -m simulations.run --epsilons 8,inf"
commit = "abc1234"
measured = "alone"

[[table]]
title = "Sites"
csv = "sites.csv"
kind = "mean"
by = ["sites"]
pivot = "target-epsilon"
values = ["test-accuracy"]
command = "python -m simulations.many_sites"
commit = "abc1234"
measured = "alone"

[elsewhere]
"""


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    """A docs folder with one sweep CSV, one sites × ε CSV and a manifest naming both."""
    (tmp_path / "sweep.csv").write_text(SWEEP_CSV)
    (tmp_path / "sites.csv").write_text(SITES_CSV)
    (tmp_path / MANIFEST).write_text(MANIFEST_TEXT)
    return tmp_path


def test_results_md_is_generated_from_its_csvs_and_manifest():
    """Edit docs/results-manifest.toml or a CSV, then run python -m simulations.results_doc."""
    assert (DOCS / OUTPUT).read_text() == render(DOCS), (
        "docs/results.md is stale: python -m simulations.results_doc"
    )


def test_a_sweep_table_is_the_mean_and_std_over_seeds(docs: Path):
    text = render(docs)
    assert "| federated, DP linear probe | head | 8 | 2 | 0.850 ± 0.071 | 0.750 ± 0.071 | 7.99 | 20 |" in text
    assert "| federated | lora | inf | 1 | 0.950 ± 0.000 |" in text
    assert "```bash\npython -m simulations.run --epsilons 8,inf\n```" in text


def test_a_pivot_table_has_one_column_per_value_and_marks_empty_cells(docs: Path):
    text = render(docs)
    assert "| sites | target-epsilon 1 | target-epsilon ∞ | runs per cell |" in text
    assert "| 100 | 0.650 ± 0.071 | 0.950 ± 0.000 | 1-2 |" in text
    assert "| 500 | 0.900 ± 0.000 | – | 1 |" in text


def test_a_changed_csv_makes_the_check_fail(docs: Path):
    assert main(["--docs", str(docs)]) == 0
    assert main(["--docs", str(docs), "--check"]) == 0
    (docs / "sites.csv").write_text(SITES_CSV.replace("0.60", "0.50"))
    assert main(["--docs", str(docs), "--check"]) == 1


def test_a_csv_the_manifest_does_not_name_is_refused(docs: Path):
    shutil.copy(docs / "sites.csv", docs / "new-sweep.csv")
    with pytest.raises(ManifestError, match=r"new-sweep\.csv: in docs/ but not in results-manifest\.toml"):
        render(docs)


def test_a_table_without_its_command_is_refused(docs: Path):
    (docs / MANIFEST).write_text(MANIFEST_TEXT.replace('command = "python -m simulations.many_sites"\n', ""))
    with pytest.raises(ManifestError, match=r"sites\.csv: no 'command'"):
        render(docs)


def test_a_column_the_csv_lacks_is_named(docs: Path):
    (docs / MANIFEST).write_text(MANIFEST_TEXT.replace('values = ["test-accuracy"]', 'values = ["accuracy"]'))
    with pytest.raises(ManifestError, match=r"sites\.csv: no column accuracy"):
        render(docs)

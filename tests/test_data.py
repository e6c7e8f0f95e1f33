"""Data: readers, cleaning, label checks with clear errors, partitioners."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedllm.config import Settings
from fedllm.data import (
    DataError,
    clean,
    clean_text,
    load_splits,
    partition,
    read_table,
    validation_split,
)


def test_clean_text_unescapes_html_and_stray_quotes():
    assert (
        clean_text('"""I couldn&rsquo;t  sleep &amp;#039;at all&amp;#039;"""')
        == "I couldn\u2019t sleep 'at all'"
    )


def test_clean_drops_and_counts_empty_and_duplicates():
    frame = pd.DataFrame({"text": ["a", "a", " ", None, "b"], "label": ["x", "x", "y", "y", None]})
    cleaned, report = clean(frame, "f.csv")
    assert cleaned["text"].tolist() == ["a"]
    assert (report.empty_dropped, report.duplicates_dropped, report.rows_out) == (3, 1, 1)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_readers_and_missing_column_error_names_file_and_column(tmp_path, frame, suffix):
    path = tmp_path / f"site{suffix}"
    if suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_csv(path, sep="\t" if suffix == ".tsv" else ",", index=False)
    assert len(read_table(path, "text", "label")) == len(frame)
    with pytest.raises(DataError, match=rf"site\{suffix}.*'sentiment'"):
        read_table(path, "text", "sentiment")


def test_hf_dataset_folder(tmp_path, frame):
    import datasets

    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "ds"))
    assert len(read_table(tmp_path / "ds", "text", "label")) == len(frame)


def test_no_rows_error_names_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("text,label\n")
    with pytest.raises(DataError, match="empty.csv.*no rows"):
        read_table(path, "text", "label")


def test_unknown_test_label_error_names_file_and_column(tmp_path, frame):
    frame.to_csv(tmp_path / "train.csv", index=False)
    bad = frame.head(3).assign(label="surprised")
    bad.to_csv(tmp_path / "test.csv", index=False)
    s = Settings(dataset=str(tmp_path / "train.csv"), test_file=str(tmp_path / "test.csv"))
    with pytest.raises(DataError, match=r"test.csv.*'label'.*surprised"):
        load_splits(s)


def test_drug_reviews_bundled_and_clean():
    splits = load_splits(Settings(dataset="drug-reviews"))
    assert splits.labels == ["negative", "neutral", "positive"]
    held_out = len(splits.validation) + len(splits.test)
    assert len(splits.train) == 600 and 370 <= held_out <= 379
    assert not splits.train["text"].str.contains("&#039;|&amp;|&quot;").any()
    assert not splits.train["text"].str.startswith('"').any()
    assert "condition" in splits.train.columns


def test_bbc_news_stratified_split():
    splits = load_splits(Settings(dataset="bbc-news"))
    assert len(splits.labels) == 5
    total = len(splits.train) + len(splits.validation) + len(splits.test)
    assert 2100 <= total <= 2225
    held_out = pd.concat([splits.validation, splits.test])
    shares = held_out["label"].value_counts() / splits.train["label"].value_counts()
    assert shares.between(0.22, 0.28).all()


def test_validation_split_is_a_seeded_stratified_half_of_the_held_out_data():
    splits = load_splits(Settings(dataset="bbc-news", seed=3))
    again = load_splits(Settings(dataset="bbc-news", seed=3))
    pd.testing.assert_frame_equal(splits.validation, again.validation)
    validation, test = set(splits.validation["text"]), set(splits.test["text"])
    assert not validation & test and not validation & set(splits.train["text"])
    per_label = pd.DataFrame(
        {"validation": splits.validation["label"].value_counts(), "test": splits.test["label"].value_counts()}
    )
    assert ((per_label["validation"] - per_label["test"]).abs() <= 1).all()  # each label halved
    other = load_splits(Settings(dataset="bbc-news", seed=3, validation_fraction=0.3))
    assert abs(len(other.validation) / (len(other.validation) + len(other.test)) - 0.3) < 0.01
    # the held-out data is the same; only its cut into validation and test moves
    assert set(other.validation["text"]) | set(other.test["text"]) == validation | test


def test_validation_split_depends_on_the_seed_and_allows_none(frame):
    a, _ = validation_split(frame, 0.5, seed=0)
    b, _ = validation_split(frame, 0.5, seed=1)
    assert set(a["text"]) != set(b["text"])
    none, everything = validation_split(frame, 0.0, seed=0)
    assert none.empty and len(everything) == len(frame)
    with pytest.raises(ValueError, match="validation-fraction"):
        validation_split(frame, 1.0, seed=0)


def test_partitions_cover_the_data(frame):
    for scheme in ("iid", "dirichlet"):
        parts = partition(frame, 3, scheme, alpha=0.5, seed=0)
        assert sum(len(p) for p in parts) == len(frame)
        assert all(len(p) > 0 for p in parts)


def test_iid_sites_each_get_every_label_even_from_a_table_sorted_by_label():
    labels = ["business", "sport", "tech", "politics"]
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(400)], "label": np.repeat(labels, 100)})
    parts = partition(frame, 4, "iid", seed=0)
    for part in parts:
        shares = part["label"].value_counts(normalize=True)
        assert set(shares.index) == set(labels)
        assert shares.between(0.1, 0.4).all()
    assert not parts[0]["text"].equals(partition(frame, 4, "iid", seed=1)[0]["text"])


def test_natural_split_keeps_each_condition_at_one_site(frame):
    parts = partition(frame, 3, "natural", column="condition")
    sites = [set(p["condition"]) for p in parts]
    assert sum(len(s) for s in sites) == frame["condition"].nunique()
    assert all(a.isdisjoint(b) for i, a in enumerate(sites) for b in sites[i + 1 :])
    with pytest.raises(DataError, match="partition-column"):
        partition(frame, 3, "natural", column="hospital")

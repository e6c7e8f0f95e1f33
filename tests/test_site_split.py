"""A site's train/test split is a stable privacy unit: a row's side depends on its text and a key.

A seeded permutation moved about a fifth of the rows between train and test when one row was
added (a record's membership then depended on the others); duplicate removal kept the first
occurrence (row order decided which record survived).
"""

from __future__ import annotations

import hashlib
import hmac

import pandas as pd
import pytest

from fedllm.config import Settings
from fedllm.data import DataError, clean, load_site_file, partition_sites, site_split

from .conftest import LABELS

KEY = b"a site's own secret split key"


def _table(n: int, start: int = 0) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "text": [f"review {i}: the medicine did what it said" for i in range(start, start + n)],
            "label": [LABELS[i % 3] for i in range(start, start + n)],
        }
    )


def _in_test(text: str, key: bytes, fraction: float) -> bool:
    """The documented rule, computed independently of fedllm."""
    digest = hmac.new(key, text.encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _test_texts(frame: pd.DataFrame, fraction: float = 0.2, key: bytes = KEY) -> set[str]:
    train, test = site_split(frame, fraction, key)
    assert len(train) + len(test) == len(frame)
    assert set(train["text"]).isdisjoint(test["text"])
    return set(test["text"])


def test_adding_a_row_moves_no_other_row():
    table = _table(1000)
    before = _test_texts(table)
    after = _test_texts(pd.concat([table, _table(1, start=1000)], ignore_index=True))
    assert after - {"review 1000: the medicine did what it said"} == before


def test_row_order_does_not_change_any_rows_split():
    table = _table(1000)
    before = _test_texts(table)
    for seed in range(3):
        assert _test_texts(table.sample(frac=1.0, random_state=seed)) == before


def test_membership_is_the_keyed_hash_of_the_text():
    table = _table(1000)
    assert _test_texts(table) == {t for t in table["text"] if _in_test(t, KEY, 0.2)}


def test_different_keys_give_different_splits():
    table = _table(1000)
    first, second = _test_texts(table, key=b"site-1 key"), _test_texts(table, key=b"site-2 key")
    assert first != second
    assert len(first & second) < 0.5 * min(len(first), len(second))  # about 0.2 of each overlaps


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_test_share_is_close_to_the_test_fraction(fraction):
    share = len(_test_texts(_table(1000), fraction)) / 1000
    assert abs(share - fraction) < 0.05  # binomial sd <= 0.016 for 1,000 rows


def test_a_site_whose_rows_all_hash_to_test_fails_naming_its_source():
    texts = [t for t in _table(200)["text"] if _in_test(t, KEY, 0.2)][:2]
    with pytest.raises(DataError, match=r"clinic\.csv"):
        site_split(pd.DataFrame({"text": texts, "label": ["negative"] * 2}), 0.2, KEY, "clinic.csv")


def test_a_test_split_may_be_empty_and_is_not_forced():
    texts = [t for t in _table(200)["text"] if not _in_test(t, KEY, 0.2)][:3]
    train, test = site_split(pd.DataFrame({"text": texts, "label": ["negative"] * 3}), 0.2, KEY)
    assert len(train) == 3 and test.empty


def test_load_site_file_splits_with_the_sites_key(tmp_path):
    path = tmp_path / "site.csv"
    _table(300).sample(frac=1.0, random_state=0).to_csv(path, index=False)
    site = load_site_file(path, "text", "label", LABELS, Settings(test_fraction=0.2), KEY)
    assert set(site.test["text"]) == {t for t in _table(300)["text"] if _in_test(t, KEY, 0.2)}
    other = load_site_file(path, "text", "label", LABELS, Settings(test_fraction=0.2), b"other")
    assert set(other.test["text"]) != set(site.test["text"])


def test_simulated_sites_use_a_key_from_the_run_seed_and_partition(tmp_path, settings):
    path = tmp_path / "all.csv"
    _table(300).to_csv(path, index=False)
    s = settings.replace(dataset=str(path), test_fraction=0.2, seed=7)
    sites = partition_sites(s, LABELS, 3, "iid")
    for i, site in enumerate(sites):
        key = f"fedllm-sim:7:{i}".encode()
        texts = pd.concat([site.train, site.test])["text"]
        assert set(site.test["text"]) == {t for t in texts if _in_test(t, key, 0.2)}


def _duplicates() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "text": ["same words", "other", "same words", "third", "other", "same words", "fourth"],
            "label": ["positive", "neutral", "negative", "neutral", "negative", "negative", "x"],
            "condition": ["c1", "c2", "c3", "c4", "c5", "c0", "c6"],
        }
    )


def test_duplicate_removal_keeps_the_same_rows_whatever_the_row_order():
    table = _duplicates()
    kept, report = clean(table, "dups.csv")
    assert report.duplicates_dropped == 1 and report.rows_out == 6
    # of identical (text, label) rows the rest of the row decides (c0 < c3); other labels stay
    rows = set(kept.itertuples(index=False, name=None))
    assert ("same words", "negative", "c0") in rows and ("same words", "negative", "c3") not in rows
    assert {("same words", "positive", "c1"), ("other", "neutral", "c2"), ("other", "negative", "c5")} <= rows
    for seed in range(5):
        shuffled = table.sample(frac=1.0, random_state=seed).reset_index(drop=True)
        again, again_report = clean(shuffled, "dups.csv")
        assert set(again.itertuples(index=False, name=None)) == rows
        assert again_report.duplicates_dropped == 1
        survivors = list(again.itertuples(index=False, name=None))  # in their input order:
        assert survivors == [r for r in shuffled.itertuples(index=False, name=None) if r in rows]


def test_adding_a_row_with_a_known_text_and_another_label_adds_one_example():
    """Issue 23, 4: keeping the smallest label per text turned this addition into a substitution."""
    base = pd.DataFrame({"text": ["my chemo made me sick", "fine"], "label": ["positive", "neutral"]})
    added = pd.concat([base, pd.DataFrame({"text": ["my chemo made me sick"], "label": ["negative"]})])
    before, _ = clean(base, "d.csv")
    after, _ = clean(added.reset_index(drop=True), "d.csv")
    rows_before = set(before.itertuples(index=False, name=None))
    rows_after = set(after.itertuples(index=False, name=None))
    assert rows_before < rows_after and len(rows_after - rows_before) == 1  # D' = D + one row
    again, _ = clean(pd.concat([added, base.iloc[:1]]).reset_index(drop=True), "d.csv")
    assert set(again.itertuples(index=False, name=None)) == rows_after  # an exact copy adds nothing

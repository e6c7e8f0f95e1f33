"""fedllm.partition: one table over sites (iid, dirichlet, natural), every row at exactly one site."""

from __future__ import annotations

import pandas as pd
import pytest

from fedllm.partition import assign_groups, partition
from fedllm.readers import DataError


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "natural"])
def test_every_row_lands_at_exactly_one_site(frame, scheme):
    parts = partition(frame, 3, scheme, alpha=1.0, column="condition", seed=0)
    assert len(parts) == 3 and all(len(p) for p in parts)
    together = pd.concat(parts).sort_values("text").reset_index(drop=True)
    pd.testing.assert_frame_equal(together, frame.sort_values("text").reset_index(drop=True))


def test_a_natural_split_keeps_each_value_at_one_site_and_groups_balance_sizes(frame):
    parts = partition(frame, 2, "natural", column="condition")
    seen = [set(p["condition"]) for p in parts]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(frame["condition"])
    groups = assign_groups(pd.Series(["a"] * 5 + ["b"] * 3 + ["c"] * 2), 2)
    assert groups.value_counts().sort_index().tolist() == [5, 5]  # a | b + c


def test_too_few_rows_or_values_or_an_unknown_column_is_refused(frame):
    with pytest.raises(DataError, match="cannot be split over 100 sites"):
        partition(frame, 100)
    with pytest.raises(DataError, match="fewer distinct values than 6 sites"):
        partition(frame, 6, "natural", column="condition")
    with pytest.raises(DataError, match="column 'ward' not in the data"):
        partition(frame, 2, "natural", column="ward")

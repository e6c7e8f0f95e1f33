"""Splitting one table over sites with flwr-datasets' partitioners: iid, dirichlet, natural."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedllm.readers import DataError


def assign_groups(values: pd.Series, num_groups: int) -> pd.Series:
    """Map each distinct value to one of ``num_groups`` groups of similar size (largest first).

    Used for a natural split: every condition (say) lives at exactly one site.
    """
    counts = values.value_counts(sort=False)
    order = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
    sizes = [0] * num_groups
    mapping = {}
    for value, count in order:
        group = int(np.argmin(sizes))
        mapping[value] = group
        sizes[group] += count
    return values.map(mapping)


def partition(
    frame: pd.DataFrame,
    num_partitions: int,
    scheme: str = "iid",
    alpha: float = 1.0,
    column: str = "",
    seed: int = 42,
) -> list[pd.DataFrame]:
    """Split a table over sites with flwr-datasets partitioners.

    ``scheme``: ``iid``; ``dirichlet`` (over labels, concentration ``alpha``); ``natural``
    (by ``column``, each distinct value at one site, values packed into ``num_partitions``).
    flwr-datasets is imported here: with Hugging Face datasets, matplotlib and seaborn it costs
    ~1.5 s, which a deployed site, whose one file is its data, never needs.
    """
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    if num_partitions < 1:
        raise ValueError("num-partitions must be >= 1")
    if len(frame) < num_partitions:
        raise DataError(f"{len(frame)} rows cannot be split over {num_partitions} sites")
    frame = frame.reset_index(drop=True)
    if scheme == "iid":
        # IidPartitioner cuts contiguous shards and expects shuffled rows (FederatedDataset
        # shuffles first); tables are often sorted by label, which would give each site one class
        frame = frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif scheme == "dirichlet":
        min_size = max(1, min(10, len(frame) // (4 * num_partitions)))
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_size,
            self_balancing=True,
            seed=seed,
        )
    elif scheme == "natural":
        if column not in frame.columns:
            raise DataError(
                f"natural split: column {column!r} not in the data {list(frame.columns)}; "
                "set partition-column"
            )
        frame = frame.assign(_site=assign_groups(frame[column].fillna("unknown").astype(str), num_partitions))
        if frame["_site"].nunique() < num_partitions:
            raise DataError(f"column {column!r} has fewer distinct values than {num_partitions} sites")
        partitioner = NaturalIdPartitioner(partition_by="_site")
    else:
        raise ValueError(f"unknown partitioning {scheme!r}: use iid, dirichlet or natural")
    partitioner.dataset = datasets.Dataset.from_pandas(frame, preserve_index=False)
    parts = [partitioner.load_partition(i).to_pandas() for i in range(num_partitions)]
    return [p.drop(columns=["_site"], errors="ignore").reset_index(drop=True) for p in parts]

"""Data: cleaning, label maps, tokenization, sites' splits (readers: ``fedllm.readers``; splitting a
table over sites: ``fedllm.partition``).

Every table is a ``pandas.DataFrame`` with a ``text`` and a ``label`` column (label *names*);
other columns (e.g. ``condition``) are kept so a partitioner can split by them.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import TensorDataset
from transformers import PreTrainedTokenizerBase

from fedllm.config import Settings
from fedllm.partition import partition
from fedllm.readers import DataError, read_bbc_news, read_table

BUNDLED = Path(__file__).parent / "bundled"
BUILTIN = ("bbc-news", "drug-reviews")
DRUG_COLUMNS = {"text_column": "review", "label_column": "rating"}
UNLISTED_LABEL = -100  # a label the run does not list: cross-entropy's ignore index (zero gradient)


@dataclass
class CleanReport:
    """What cleaning did to one table."""

    source: str
    rows_in: int = 0
    empty_dropped: int = 0
    duplicates_dropped: int = 0
    rows_out: int = 0

    def __str__(self) -> str:
        return (
            f"{self.source}: {self.rows_in} rows -> {self.rows_out} "
            f"({self.empty_dropped} without text or label, {self.duplicates_dropped} duplicates dropped)"
        )


@dataclass
class Splits:
    """Train, validation and test tables, the label names (id order) and cleaning reports.

    ``validation`` and ``test`` are the two parts of the server's held-out data
    (``validation_split``): settings are chosen on ``validation``, results reported on ``test``.
    """

    train: pd.DataFrame
    test: pd.DataFrame
    labels: list[str]
    reports: list[CleanReport] = field(default_factory=list)
    validation: pd.DataFrame = field(default_factory=lambda: pd.DataFrame({"text": [], "label": []}))


# ---------------------------------------------------------------- cleaning

_SPACES = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Unescape HTML entities (twice: the drug reviews hold ``&amp;#039;``), drop stray quotes."""
    text = html.unescape(html.unescape(str(text)))
    text = _SPACES.sub(" ", text).strip()
    while len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].strip()
    return text.replace('""', '"')


def clean(frame: pd.DataFrame, source: str) -> tuple[pd.DataFrame, CleanReport]:
    """Clean texts and labels; drop rows without a text or a label and duplicate rows, counting both.

    A duplicate is a row whose (text, label) pair an earlier row already has: one example, kept
    once (the first, by the other columns compared as strings, so which record survives does not
    depend on row order). Rows sharing a text with *different* labels are different examples and
    are all kept: dropping or choosing between them would turn adding one row into replacing
    another (docs/privacy.md, "Duplicates"). The surviving rows keep their order.
    """
    report = CleanReport(source=source, rows_in=len(frame))
    frame = frame.copy()
    frame["text"] = frame["text"].map(lambda t: "" if pd.isna(t) else clean_text(t))
    frame["label"] = frame["label"].map(lambda v: "" if pd.isna(v) else str(v).strip())
    keep = (frame["text"] != "") & (frame["label"] != "")
    report.empty_dropped = int((~keep).sum())
    frame = frame[keep].reset_index(drop=True)
    others = sorted((c for c in frame.columns if c not in ("text", "label")), key=str)
    ranking = pd.DataFrame(
        {"text": frame["text"], "label": frame["label"]}
        | {f"_{i}": frame[c].astype(str) for i, c in enumerate(others)}
    )
    first = ranking.sort_values(list(ranking.columns), kind="stable").drop_duplicates(["text", "label"]).index
    dup = ~frame.index.isin(first)
    report.duplicates_dropped = int(dup.sum())
    frame = frame[~dup].reset_index(drop=True)
    report.rows_out = len(frame)
    if frame.empty:
        raise DataError(f"{source}: no usable rows left after dropping empty/duplicate texts")
    return frame, report


# ---------------------------------------------------------------- splits and labels


def stratified_split(frame: pd.DataFrame, test_fraction: float, seed: int):
    """Seeded split keeping each label's share in both parts."""
    test = frame.groupby("label", group_keys=False).sample(frac=test_fraction, random_state=seed)
    train = frame.drop(index=test.index)
    return train.reset_index(drop=True), test.reset_index(drop=True)


VALIDATION_STREAM = 1  # the validation draw's own seed stream, apart from the train/test draw's


def validation_split(held_out: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The server's held-out table split into (validation, test): stratified by label, seeded.

    Each label keeps ``round(fraction * its rows)`` rows in validation, drawn with a generator
    seeded by ``(seed, VALIDATION_STREAM)``: the same table and seed give the same parts on every
    machine, and the draw is independent of the train/test one made with ``seed``. Public: it
    depends only on the server's own held-out data and the run's seed. ``fraction`` 0 gives an
    empty validation table (every held-out row is test).
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"validation-fraction={fraction!r}: use a value in [0, 1)")
    held_out = held_out.reset_index(drop=True)
    rng = np.random.default_rng([seed, VALIDATION_STREAM])
    picked = held_out.groupby("label", group_keys=False, sort=True).sample(frac=fraction, random_state=rng)
    validation = held_out.loc[sorted(picked.index)]
    test = held_out.drop(index=validation.index)
    return validation.reset_index(drop=True), test.reset_index(drop=True)


def label_names(frame: pd.DataFrame) -> list[str]:
    """Label names in id order (sorted; numerically when all labels are integers)."""
    names = frame["label"].unique().tolist()
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def check_labels(frame: pd.DataFrame, labels: list[str], source: str, column: str) -> None:
    """Raise ``DataError`` naming file and column when a label is not in the label map."""
    unknown = sorted(set(frame["label"]) - set(labels))
    if unknown:
        raise DataError(
            f"{source}: column {column!r} holds labels {unknown[:5]} that are not among the "
            f"training labels {labels}; fix the file or add those classes to the training data"
        )


def load_splits(settings: Settings, labels: list[str] | None = None) -> Splits:
    """Load, clean and split the configured data set: train, and the server's held-out data
    (the built-in test split, ``test-file`` or ``test-fraction`` of the rows) cut into validation
    and test by ``validation_split`` (``validation-fraction`` of it is validation).

    ``labels`` fixes the label map (e.g. the federation's); otherwise it is read from the
    training data.
    """
    name = settings.dataset
    text_col, label_col = settings.text_column, settings.label_column
    if name == "bbc-news":
        frame, report = clean(read_bbc_news(), "bbc-news")
        train, test = stratified_split(frame, settings.test_fraction, settings.seed)
        reports = [report]
    elif name == "drug-reviews":
        root = BUNDLED / "drugscom"
        cols = DRUG_COLUMNS
        train, r1 = clean(read_table(root / "drugsComTrain.tsv", **cols), "drugsComTrain.tsv")
        test, r2 = clean(read_table(root / "drugsComTest.tsv", **cols), "drugsComTest.tsv")
        test = test[~test["text"].isin(set(train["text"]))].reset_index(drop=True)
        reports = [r1, r2]
        text_col, label_col = cols["text_column"], cols["label_column"]
    else:
        frame, report = clean(read_table(name, text_col, label_col), name)
        reports = [report]
        if settings.test_file:
            test, r2 = clean(read_table(settings.test_file, text_col, label_col), settings.test_file)
            reports.append(r2)
            train = frame
        else:
            train, test = stratified_split(frame, settings.test_fraction, settings.seed)
    labels = labels or label_names(train)
    check_labels(train, labels, name, label_col)
    check_labels(test, labels, settings.test_file or name, label_col)
    validation, test = validation_split(test, settings.validation_fraction, settings.seed)
    return Splits(train=train, test=test, labels=labels, reports=reports, validation=validation)


# ---------------------------------------------------------------- tokenization

# BERT's WordPiece turns a word of up to 100 characters into at least one token and a longer
# word into one [UNK]; cleaned texts hold single spaces. So max_length * 101 characters hold at
# least max_length tokens unless the text is made of words over 100 characters or of characters
# the tokenizer drops (controls, zero-width marks): cutting there costs no token otherwise.
CHARS_PER_TOKEN = 101


def cut_text(text: str, max_length: int, truncation: str = "right") -> str:
    """The part of ``text`` that can reach the first (``right``) or last (``left``) ``max_length``
    tokens: at most ``max_length * CHARS_PER_TOKEN`` characters, so that tokenizing a 10 MB text
    costs what its kept part does and gives the same ids (see ``CHARS_PER_TOKEN``)."""
    bound = max_length * CHARS_PER_TOKEN
    if len(text) <= bound:
        return text
    return text[-bound:] if truncation == "left" else text[:bound]


def tokenize(
    frame: pd.DataFrame,
    tokenizer: PreTrainedTokenizerBase,
    labels: list[str],
    max_length: int,
    truncation: str = "right",
) -> TensorDataset:
    """(input_ids, attention_mask, label_id) tensors, padded to ``max_length``.

    A label not in ``labels`` gets the id ``UNLISTED_LABEL`` (cross-entropy's ignore index): the
    row stays an example (in n) with a zero loss and gradient, and evaluation leaves it out.

    Fixed-size tensors keep Opacus' empty-batch handling simple; the training loop trims each
    batch to its longest text, so padding costs no compute. ``truncation="left"`` keeps the
    end of long texts (where reviews tend to give their verdict). Each text is first cut to
    the characters its kept tokens can come from (``cut_text``): a long text costs no more than
    ``max_length`` needs.
    """
    if frame.empty:
        none = torch.zeros((0, max_length), dtype=torch.long)
        return TensorDataset(none, none.clone(), torch.zeros(0, dtype=torch.long))
    tokenizer.truncation_side = truncation
    enc = tokenizer(
        [cut_text(str(text), max_length, truncation) for text in frame["text"]],
        truncation=True,
        max_length=max_length,
        padding="max_length",
        return_tensors="pt",
    )
    index = {name: i for i, name in enumerate(labels)}
    ids = torch.tensor([index.get(v, UNLISTED_LABEL) for v in frame["label"]], dtype=torch.long)
    return TensorDataset(enc["input_ids"], enc["attention_mask"], ids)


def class_weights(frame: pd.DataFrame, labels: list[str]) -> torch.Tensor:
    """Inverse-frequency class weights, normalised to mean 1 (absent classes get weight 1)."""
    counts = np.array([(frame["label"] == name).sum() for name in labels], dtype=np.float64)
    weights = np.where(counts > 0, counts.sum() / (len(labels) * np.maximum(counts, 1)), 1.0)
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


def loss_weights(settings: Settings, frame: pd.DataFrame, labels: list[str]) -> torch.Tensor | None:
    """The per-class loss weights a training may use.

    Explicit ``class-weights`` (public knowledge) always; inverse frequency of the training
    labels only without DP: weights computed from the private labels would make every example's
    loss depend on the others and break DP-SGD's per-example sensitivity.
    """
    if settings.class_weights:
        values = [float(x) for x in settings.class_weights.split(",")]
        if len(values) != len(labels) or min(values) <= 0:
            raise ValueError(
                f"class-weights has {len(values)} values for labels {labels}: give one positive "
                "weight per label, in label order"
            )
        return torch.tensor(values, dtype=torch.float32)
    if settings.class_weighting and not settings.private:
        return class_weights(frame, labels)
    return None


# ---------------------------------------------------------------- sites


def site_split(frame: pd.DataFrame, test_fraction: float, key: bytes, source: str = "site data"):
    """A site's local train / test split: a row is in test iff its keyed text hash is small.

    Row ``text`` is in the test split iff ``HMAC-SHA256(key, text)``, its first 8 bytes read as
    a big-endian integer over 2**64, is below ``test_fraction``. A record's side depends only
    on its own text and the site's secret ``key``: adding, removing or reordering other rows
    moves no record between train and test, and whoever does not hold the key cannot tell
    which side a record is on. The test share is ``test_fraction`` on average, not exactly.

    The test split is *not* forced to be non-empty (that would make one record's side depend
    on the others): a tiny site may get an empty test split, which callers must accept
    (``evaluate`` scores an empty table as zero examples). Raises ``DataError`` naming
    ``source`` when no row is left to train on.
    """
    if not isinstance(key, bytes) or not key:
        raise ValueError(f"{source}: the split key must be non-empty bytes, got {type(key).__name__}")

    def in_test(text: object) -> bool:
        digest = hmac.new(key, str(text).encode(), hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction

    mask = np.array([in_test(text) for text in frame["text"]], dtype=bool)
    train, test = frame[~mask], frame[mask]
    if len(train) == 0:
        raise DataError(
            f"{source}: all {len(frame)} usable rows fell in the test split "
            f"(test-fraction {test_fraction}); too few to train on - add data or lower test-fraction"
        )
    return train.reset_index(drop=True), test.reset_index(drop=True)


@dataclass
class SiteData:
    """One site's local train and test tables (the site's test split stays at the site)."""

    train: pd.DataFrame
    test: pd.DataFrame
    source: str


def partition_sites(
    settings: Settings,
    labels: list[str],
    num_partitions: int,
    scheme: str,
    alpha: float = 1.0,
    column: str = "",
) -> list[SiteData]:
    """Simulated sites: the training split partitioned, each part split into local train/test.

    Partition ``i`` splits with the key ``fedllm-sim:{seed}:{i}`` (see ``site_split``): a
    simulation's data is the researcher's own, so its key may derive from the run's seed; a
    deployed site passes its own secret key to ``load_site_file``.
    Cheap to keep for thousands of sites (small tables, one row each per example); models and
    tokenized tensors are only built for the sites that a round samples.
    """
    splits = load_splits(settings, labels)
    parts = partition(splits.train, num_partitions, scheme, alpha, column, settings.seed)
    sites = []
    for i, part in enumerate(parts):
        train, test = site_split(
            part,
            settings.test_fraction,
            f"fedllm-sim:{settings.seed}:{i}".encode(),
            f"{settings.dataset}: partition {i} of {num_partitions} ({len(part)} rows; use fewer sites)",
        )
        sites.append(SiteData(train, test, f"{settings.dataset} partition {i}/{num_partitions}"))
    return sites


def load_site_file(
    path: str | Path,
    text_column: str,
    label_column: str,
    labels: list[str],
    settings: Settings,
    key: bytes,
) -> SiteData:
    """A real site: its own data file, cleaned, checked against the federation's labels, split.

    ``key`` is the site's own secret split key (never the server's seed): a record's side of
    the train / test split depends only on its text and this key (``site_split``). Rows whose
    label ``labels`` does not list are kept (``tokenize`` gives them a zero gradient) and counted
    in ``source``, which stays in the site's own log: whether the run lists every label of the
    site is never an error the server could see.
    """
    frame, report = clean(read_table(path, text_column, label_column), str(path))
    train, test = site_split(frame, settings.test_fraction, key, str(path))
    unlisted = int((~train["label"].isin(labels)).sum())
    note = (
        f", {unlisted} training rows with a label the run does not list (zero gradient)" if unlisted else ""
    )
    return SiteData(train, test, f"{path} ({report}{note})")

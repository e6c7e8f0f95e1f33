"""Canaries for the empirical privacy audit (``fedllm.audit``): m records, each assigned to one
site at random and inserted there with probability ½, independently, from a seeded numpy
generator (the audit seed). The inclusion draw is the secret the attacker guesses.

Kinds: ``random-tokens`` (words drawn from the tokenizer's vocabulary, ``vocabulary_words``) and
``mislabeled`` (real held-out rows with a wrong label). The method: docs/audit.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from transformers import PreTrainedTokenizerBase

CANARY_KINDS = ("random-tokens", "mislabeled")


@dataclass
class Canaries:
    """m canary records, the site each would join, and whether it did (the secret)."""

    texts: list[str]
    labels: list[str]
    sites: np.ndarray  # int, the site each canary is assigned to
    included: np.ndarray  # bool, inserted at its site or not (probability 1/2, independent)
    kind: str
    seed: int

    def __len__(self) -> int:
        return len(self.texts)

    def rows(self, site: int) -> pd.DataFrame:
        """The canaries inserted at ``site``: a ``text``/``label`` table to add to its training data."""
        keep = (self.sites == site) & self.included
        return self.frame()[keep][["text", "label"]].reset_index(drop=True)

    def frame(self) -> pd.DataFrame:
        """Every canary with its site and inclusion (for saving next to the scores)."""
        return pd.DataFrame(
            {"text": self.texts, "label": self.labels, "site": self.sites, "included": self.included}
        )


def vocabulary_words(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The tokenizer's whole-word, alphabetic vocabulary entries (no ``##`` pieces, no specials)."""
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) > 1]
    return sorted(set(words) - set(tokenizer.all_special_tokens))


def draw_canaries(
    m: int,
    num_sites: int,
    seed: int,
    *,
    kind: str,
    labels: Sequence[str],
    vocabulary: Sequence[str] = (),
    source: pd.DataFrame | None = None,
    label: str = "",
    length: int = 32,
) -> Canaries:
    """Draw m canaries, their sites and their inclusion from ``seed`` alone.

    ``random-tokens``: ``length`` words drawn uniformly from ``vocabulary``, labelled ``label``
    (``""``: each canary a label drawn uniformly from ``labels``). ``mislabeled``: m distinct
    rows of ``source`` (``text``, ``label``; e.g. the held-out split), each with a label drawn
    uniformly from the others. Three independent streams spawned from ``seed`` draw the
    contents, the sites (uniform over ``num_sites``) and the inclusions (each 1/2,
    independently): the secret does not depend on what the canaries are.
    """
    if m < 0 or num_sites < 1:
        raise ValueError(f"canaries={m}, sites={num_sites}: use canaries >= 0 and sites >= 1")
    content, placing, secret = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    if kind == "random-tokens":
        if m and not vocabulary:
            raise ValueError("random-tokens canaries need a vocabulary (see vocabulary_words)")
        if label and label not in labels:
            raise ValueError(f"canary label {label!r} is not one of the labels {list(labels)}: use one or ''")
        words = np.asarray(vocabulary)
        texts = [" ".join(content.choice(words, size=length)) for _ in range(m)]
        names = [label or labels[int(content.integers(len(labels)))] for _ in range(m)]
    elif kind == "mislabeled":
        if source is None or len(source) < m:
            have = 0 if source is None else len(source)
            raise ValueError(f"mislabeled canaries: {m} wanted, {have} source rows; use fewer canaries")
        rows = source.iloc[content.choice(len(source), size=m, replace=False)]
        texts = [str(t) for t in rows["text"]]
        names = []
        for true in rows["label"]:
            others = [name for name in labels if name != true]
            names.append(others[int(content.integers(len(others)))])
    else:
        raise ValueError(f"unknown canary kind {kind!r}: use one of {CANARY_KINDS}")
    sites = placing.integers(0, num_sites, size=m)
    included = secret.random(m) < 0.5
    return Canaries(texts, names, sites, included, kind, seed)

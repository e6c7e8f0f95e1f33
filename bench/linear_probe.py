"""The floor fine-tuning must beat: logistic regression on frozen mean-pooled embeddings.

    python bench/linear_probe.py [--dataset bbc-news|drug-reviews] [--max-length 128]

Embeds the train and test splits with the embedded MiniLM (no training), fits a multinomial
logistic regression on the train embeddings and prints test accuracy and macro-F1, next to the
majority-class baseline.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from transformers import AutoModel

from fedllm.config import Settings
from fedllm.data import load_splits, tokenize
from fedllm.model import embedded_model_path, load_tokenizer


@torch.no_grad()
def embed(model, data, batch_size: int = 64) -> np.ndarray:
    """Mask-aware mean of the last hidden states, one row per text."""
    out = []
    for start in range(0, len(data), batch_size):
        ids, mask, _ = data[start : start + batch_size]
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        out.append(((hidden * m).sum(1) / m.sum(1)).numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="bbc-news")
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    settings = Settings(dataset=args.dataset, max_length=args.max_length)
    splits = load_splits(settings)
    tokenizer = load_tokenizer("")
    model = AutoModel.from_pretrained(str(embedded_model_path())).eval()
    train = tokenize(splits.train, tokenizer, splits.labels, args.max_length)
    test = tokenize(splits.test, tokenizer, splits.labels, args.max_length)
    x_train, x_test = embed(model, train), embed(model, test)
    y_train, y_test = train.tensors[2].numpy(), test.tensors[2].numpy()
    probe = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    pred = probe.predict(x_test)
    majority = np.full_like(y_test, np.bincount(y_train).argmax())
    print(f"{args.dataset}: {len(y_train)} train / {len(y_test)} test texts, max length {args.max_length}")
    print(
        f"majority class : accuracy {accuracy_score(y_test, majority):.3f}  "
        f"macro-F1 {f1_score(y_test, majority, average='macro'):.3f}"
    )
    print(
        f"linear probe   : accuracy {accuracy_score(y_test, pred):.3f}  "
        f"macro-F1 {f1_score(y_test, pred, average='macro'):.3f}"
    )


if __name__ == "__main__":
    main()

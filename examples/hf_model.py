"""A Hugging Face model and dict-batch dataset as sampa-ray plug-ins: modular addition with BERT.

Run from this folder (``examples/``), so that ``hf_model`` is importable:

    sampa-ray train --model hf_model:build --dataset hf_model:load --optimizer adamw \\
        --lr 1e-3 --weight-decay 1.0 --batch-size 256 --steps 2000

``--model-arg KEY=VALUE`` and ``--dataset-arg KEY=VALUE`` (repeatable), or a config file's
``model_args`` and ``dataset_args``, pass the keyword arguments below, e.g.
``--dataset-arg p=23 --dataset-arg train_fraction=0.5 --model-arg layers=2``.

* ``build(num_classes, ...)`` returns a small ``BertForSequenceClassification`` made from a
  ``BertConfig`` with random weights: nothing is downloaded (``HF_HUB_OFFLINE=1`` is set before
  ``transformers`` is imported). Its initialisation draws from torch's global RNG, so the
  framework's ``torch.manual_seed(seed)`` before ``build`` makes every replica identical, and
  every dropout probability is 0, so two replicas given the same batch give the same gradient.
* ``load(p, train_fraction, split_seed)`` returns the same split as the built-in ``modadd``
  dataset (``sampa_ray.data.modadd``), with items as dicts of tensors:
  ``{"input_ids": (4,), "attention_mask": (4,), "labels": ()}``, all int64. Input ids are
  ``[CLS, a, b, =]`` with ``=`` = p and ``CLS`` = p + 1; the label is ``(a + b) mod p``.
  ``default_collate`` stacks them into a dict batch, and the default loss is
  ``model(**batch).loss`` (cross-entropy over ``num_labels`` classes).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never reach the Hub

import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from sampa_ray.data import modadd  # noqa: E402

__all__ = ["ModAddDicts", "build", "load"]

SEQ_LEN = 4  # [CLS, a, b, =]


class ModAddDicts(Dataset):
    """Modular addition items as Hugging Face style dicts; ``num_classes`` = p."""

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor, p: int) -> None:
        cls = torch.full((len(tokens), 1), p + 1, dtype=torch.long)
        self.input_ids = torch.cat([cls, tokens], dim=1)  # [CLS, a, b, =]
        self.labels = labels
        self.num_classes = p

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": self.labels[i]}


def load(p: int = 23, train_fraction: float = 0.5,
         split_seed: int = 0) -> tuple[ModAddDicts, ModAddDicts]:
    """The modular-addition split of ``sampa_ray.data.modadd.load`` as dict items."""
    train, test = modadd.load(p=p, train_fraction=train_fraction, split_seed=split_seed)
    return (ModAddDicts(*train.tensors, p), ModAddDicts(*test.tensors, p))


def build(num_classes: int, vocab: int | None = None, hidden_size: int = 64, layers: int = 2,
          heads: int = 2, intermediate_size: int = 128) -> BertForSequenceClassification:
    """A randomly initialised BERT classifier with ``num_classes`` labels; ``vocab`` defaults
    to ``num_classes + 2`` (the numbers, '=' and CLS)."""
    config = BertConfig(
        vocab_size=num_classes + 2 if vocab is None else vocab,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=SEQ_LEN,
        type_vocab_size=1,
        num_labels=num_classes,
        problem_type="single_label_classification",
        hidden_dropout_prob=0.0,  # no dropout: identical replicas give identical gradients
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
    )
    return BertForSequenceClassification(config)

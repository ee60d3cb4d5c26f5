"""Named training recipes: the config fields a run starts from with ``--recipe NAME``; a YAML
file (``--config``) and flags override them, in that order.

``paper`` is the official code's recipe (LIONS-EPFL/SAMPa ``train.py`` and ``get_dataset.py``,
ResNet-56 on CIFAR-10 with its defaults) wherever that code is not a slip; README "Reproducing the
paper" lists what still differs and why. The presets ``configs/paper-<model>-<dataset>.yaml``
are this recipe with another model or dataset, written out in full (a test keeps them equal).
"""

from __future__ import annotations

from typing import Any

#: the official code's recipe, field by field
PAPER: dict[str, Any] = {
    "algo": "sampa",
    "model": "resnet56",          # --model resnet56
    "dataset": "cifar10",         # --dataset cifar10
    "dropout": 0.0,
    "epochs": 200,                # README: --epochs 200
    "batch_size": 128,            # --batch-size 128
    "lr": 0.1,                    # --lr 0.1
    "lr_schedule": "cosine-epoch",  # CosineAnnealingLR(optimizer, epochs), stepped per epoch
    "momentum": 0.9,              # --momentum 0.9
    "weight_decay": 5e-4,         # --weight_decay 0.0005
    "rho": 0.1,                   # --rho 0.1
    "lam": 0.2,                   # --og 0.2
    "seed": 42,                   # --seed 42
    "label_smoothing": 0.1,       # smooth_crossentropy(..., smoothing=0.1)
    "label_smoothing_mode": "official",  # 1-eps on the true class, eps/(K-1) elsewhere, KL
    "val_split": 0.1,             # 45k train / 5k validation, the best validation model tested
    "last_batch": "keep",         # DataLoader's default drop_last=False
    "cutout_p": 0.5,              # Cutout(size=16, p=0.5)
    "pad_fill": "black",          # RandomCrop(padding=4) on the image, before Normalize
    "bn_stats": "perturbed",      # evaluation on rank 0, the perturbed rank
}

RECIPES: dict[str, dict[str, Any]] = {"paper": PAPER}


def recipe(name: str) -> dict[str, Any]:
    """A copy of recipe ``name``'s fields."""
    return dict(RECIPES[name])

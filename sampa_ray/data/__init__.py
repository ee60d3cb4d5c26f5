"""Datasets held in memory and deterministic, seed-driven training batches."""

from sampa_ray.data.batches import (
    Augment,
    AugmentParams,
    BatchSchedule,
    apply_augment,
    augment_batch,
    derive_seed,
    draw_augment_params,
    seeded_generator,
)
from sampa_ray.data.datasets import DATASET_NAMES, Dataset, load_dataset

__all__ = [
    "DATASET_NAMES",
    "Augment",
    "AugmentParams",
    "BatchSchedule",
    "Dataset",
    "apply_augment",
    "augment_batch",
    "derive_seed",
    "draw_augment_params",
    "load_dataset",
    "seeded_generator",
]

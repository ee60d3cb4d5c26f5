"""The Python API on the same task: ``python fit_api.py [OUT [EPOCHS]]`` (from this folder)."""

from __future__ import annotations

import sys

import torch
from my_task import build, load, loss

import sampa_ray

if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "runs/fit-api"
    epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    result = sampa_ray.fit({"algo": "sampa", "optimizer": "adamw", "lr": 0.01,
                            "weight_decay": 0.01, "epochs": epochs, "batch_size": 64},
                           model=build, data=load, loss=loss, out=out, overwrite=True,
                           backend="local")
    net = result.model()  # the trained nn.Module: final parameters and BatchNorm statistics
    _, test = load()
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.stack([test[i][1] for i in range(len(test))])
    with torch.no_grad():
        acc = float((net(x).argmax(1) == y).float().mean())
    print(f"test accuracy {result.test_accuracy:.4f} (reloaded model: {acc:.4f}) in {out}")

"""Rebuild trained weights from the base weights and the journal alone (no data needed).

Every line of ``journal.jsonl`` is one step's (seed, projected gradient, lr, weight decay); the
update it stands for is a pure function of those and the parameter names (zoplan.runtime.zo), so
applying the lines in order to the base weights reproduces the run. Skipped steps (non-finite
loss) carry a projected gradient of 0 and change nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from zoplan.errors import ZoplanError
from zoplan.runtime.hostcopy import decays
from zoplan.runtime.zo import update_tensor


def read_journal(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append({k: row[k] for k in ("step", "seed", "projected_grad", "lr", "weight_decay")})
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ZoplanError(f"{path}:{number}: not a journal line ({exc})") from None
    return rows


@torch.no_grad()
def replay(model: nn.Module, journal: list[dict]) -> nn.Module:
    """Apply every journal line's update to ``model`` in place, in step order."""
    params = dict(model.named_parameters())
    for row in journal:
        if row["projected_grad"] == 0.0:
            continue
        for name, param in params.items():
            update_tensor(param, name, row["seed"], row["projected_grad"], row["lr"], row["weight_decay"],
                          decays(name, param))
    return model

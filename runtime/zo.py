"""MeZO's arithmetic, shared by the engine and by replay so both round the same way.

    theta <- theta - lr * (g * z + wd * theta)      (wd only on weight matrices)

is applied to any flat range of a parameter: z for that range comes from
``zoplan.runtime.perturb.normal`` (a pure function of seed, name and element index), so a rank
can update just its own slice and get the bits the whole tensor would get.
"""

from __future__ import annotations

import math

import torch

from zoplan.runtime.hostcopy import DTYPES
from zoplan.runtime.perturb import fused_backend, normal, normal_parts_
from zoplan.vocab import Schedule


def learning_rate(base_lr: float, schedule: str, step: int, total_steps: int) -> float:
    """The learning rate of ``step`` (0-based) in a run of ``total_steps``: Hugging Face's linear and
    cosine schedules without warm-up (what ZOTrainer takes), so the last step still trains
    (linear: base_lr / total_steps)."""
    if schedule == Schedule.CONSTANT:
        return base_lr
    frac = min(step / total_steps, 1.0)
    if schedule == Schedule.LINEAR:
        return base_lr * (1.0 - frac)
    if schedule == Schedule.COSINE:
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown schedule {schedule!r}")


def apply_update(x: torch.Tensor, z: torch.Tensor, g: float, lr: float, wd: float, decay: bool) -> None:
    """In place, in float32 whatever x's dtype: the update is tiny next to the weights."""
    xf = x.float()
    step = z * g
    if decay and wd:
        step = step + xf * wd
    x.copy_(xf - step * lr)


def fused_kernels(t: torch.Tensor):
    """The fused Triton kernels for tensors like ``t``, or None: see ``perturb.fused_backend``."""
    return fused_backend(t.device)


_TABLES: dict = {}  # (id(layout), start, end, device) -> (layout, BlockTable)


def layout_table(fused, layout, start: int, end: int, device: torch.device):
    """The fused kernels' table of the parameters in the flat range [start, end) of a block
    buffer with ``layout`` (positions are buffer positions), built once per range and device."""
    key = (id(layout), start, end, device)
    hit = _TABLES.get(key)
    if hit is not None and hit[0] is layout:
        return hit[1]
    parts = [
        (slot.name, first, count, start + pos, slot.decay) for slot, first, count, pos in layout.segments(start, end)
    ]
    table = fused.block_table(parts, device)
    _TABLES[key] = (layout, table)  # the layout is kept alive, so its id is never reused
    return table


def update_range(flat: torch.Tensor, layout, start: int, end: int, seed: int, g: float, lr: float, wd: float) -> None:
    """Apply one step's update to the flat range [start, end) of a block buffer."""
    fused = fused_kernels(flat)
    if fused is not None:  # the same arithmetic, every parameter in one kernel, z never materialised
        fused.update_block_(flat, layout_table(fused, layout, start, end, flat.device), seed, g, lr, wd)
        return
    segments = list(layout.segments(start, end))
    if not segments:
        return
    # z of every parameter in the range in one draw (normal_parts_: the same bits as one
    # ``normal`` per parameter, without its fixed cost per call)
    first_pos = segments[0][3]
    last_pos = segments[-1][3] + segments[-1][2]
    z = torch.empty(last_pos - first_pos, dtype=torch.float32, device=flat.device)
    normal_parts_(z, seed, [(slot.name, first, count, pos - first_pos) for slot, first, count, pos in segments])
    back_to_back = all(b[3] == a[3] + a[2] for a, b in zip(segments, segments[1:]))
    if back_to_back and (not wd or len({slot.decay for slot, _, _, _ in segments}) == 1):  # one update
        apply_update(flat[start + first_pos : start + last_pos], z, g, lr, wd, segments[0][0].decay)
        return
    for slot, first, count, pos in segments:
        apply_update(
            flat[start + pos : start + pos + count], z[pos - first_pos : pos - first_pos + count], g, lr, wd, slot.decay
        )


def update_tensor(param: torch.Tensor, name: str, seed: int, g: float, lr: float, wd: float, decay: bool) -> None:
    """One step's update of a whole parameter (replay): on a GPU the fused kernel, the same
    arithmetic as the training engine's, without a z buffer."""
    fused = fused_kernels(param)
    if fused is not None:
        fused.update_(param, seed, name, 0, g, lr, wd, decay)
        return
    z = normal(seed, name, 0, param.numel(), device=param.device).view(param.shape)
    apply_update(param, z, g, lr, wd, decay)


# a share of a block's weights that eps * z leaves as they were (in the compute dtype) past which
# the projected gradient measures the forward's rounding noise, not the loss's slope
EPS_UNRESOLVED = 0.5


def unresolved(block: torch.Tensor, param_dtype: str, eps: float, sample: int = 1 << 20) -> float:
    """The share of ``block``'s weights (a sample of them) that adding ``eps`` times a standard
    normal z leaves unchanged in the compute dtype ``param_dtype``."""
    dtype = DTYPES[param_dtype]
    theta = block[: min(sample, block.numel())].detach().to("cpu", dtype)  # (a trainer's may be on a GPU)
    z = torch.randn(theta.shape, generator=torch.Generator().manual_seed(0))
    return float(((theta.float() + eps * z).to(dtype) == theta).float().mean())


def eps_note(
    block: torch.Tensor,
    param_dtype: str,
    eps: float,
    *,
    of: str = "the first block's weights",
    option: str = "--eps",
    where: str = " (in a plan made with it)",
) -> str | None:
    """What to say where eps is below the compute dtype's resolution for most of a block's weights
    (``of``: which): their perturbed values round back to them, the two losses then differ by
    rounding noise alone, and g = (L+ - L-) / 2 eps is that noise over a tiny eps (bf16 with eps 1e-5
    on tiny-opt: 87% of the weights unchanged, the held-out loss 7.2 -> 14.1, exit 0 and not a
    word). ``option`` and ``where``: how a larger eps is given."""
    share = unresolved(block, param_dtype, eps)
    if share <= EPS_UNRESOLVED:
        return None
    larger = next((eps * 10**k for k in range(1, 7) if unresolved(block, param_dtype, eps * 10**k) < 0.1), None)
    return (
        f"eps {eps:g} is below the resolution of {param_dtype} for {share:.0%} of {of} "
        "(adding eps * z leaves them as they were): the projected gradient then measures rounding noise, not "
        "the loss's slope, and the run drifts instead of learning; "
        + (f"use {option} {larger:g} or more" if larger is not None else f"use a larger {option}")
        + (", or a wider compute dtype (fp32)" if param_dtype != "fp32" else "")
        + where
    )

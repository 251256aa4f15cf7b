"""The adapters a run may train on read-only blocks (zoplan.tuning says what each is).

Every compute rank keeps the whole adapter resident (a few hundred thousand to a few million
parameters, float32): its master values and one perturbed copy per branch the rank runs. At the
start of a step the pending update is applied to the master (z of each adapter tensor drawn again
from the step's seed, as for any parameter: zoplan.runtime.perturb), then each branch's copy is
formed, ``master + s * eps * z``, from one draw of z. A block's forward for branch s reads that
branch's copy; an evaluation reads the master. The blocks themselves stream in as uploaded and are
never perturbed, updated or written back.

LoRA (``LoRA``): ``W x + (alpha / rank) * B A x`` on each block's query and value projections, A of
``rank x in`` drawn uniform in +-1/sqrt(in) (PEFT's and nn.Linear's default) from a generator
seeded by the run's seed and the tensor's name, B zero: the model starts as the base. It is added
by a forward hook on the projection, so the streamed weights bound into the module stay as they
are. Saved in PEFT's layout (``adapter_model.safetensors``, ``adapter_config.json``): it loads with
``PeftModel.from_pretrained(base, DIR)``, and ``from_pretrained(DIR)`` where peft is installed.
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from zoplan.errors import ZoplanError
from zoplan.tuning import LORA_TARGETS, Tuning
from zoplan.vocab import Method
from zoplan.runtime.adapters import Adapter
from zoplan.runtime.perturb import normal_parts_
from zoplan.runtime.zo import apply_update

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PEFT's names: the wrapped model's own, under base_model.model


class Tuned:
    """The trained part: named float32 tensors in one flat master, a perturbed copy per branch."""

    def __init__(self, shapes: list[tuple[str, tuple[int, ...]]], device: torch.device, signs: Iterable[int]) -> None:
        self.names = [n for n, _ in shapes]
        self.shapes = dict(shapes)
        self.offsets: dict[str, int] = {}
        at = 0
        for name, shape in shapes:
            self.offsets[name] = at
            at += _numel(shape)
        self.numel = at
        self.device = device
        self.master = torch.zeros(at, dtype=torch.float32, device=device)
        self.copies = {s: torch.empty_like(self.master) for s in signs}
        self.current = self.master  # what the forward reads: the master, or a branch's copy

    def view(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        at = self.offsets[name]
        return flat[at : at + _numel(self.shapes[name])].view(self.shapes[name])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The master values by name (views)."""
        return {n: self.view(self.master, n) for n in self.names}

    def _z(self, seed: int) -> torch.Tensor:
        z = torch.empty(self.numel, dtype=torch.float32, device=self.device)
        normal_parts_(z, seed, [(n, 0, _numel(self.shapes[n]), self.offsets[n]) for n in self.names])
        return z

    @torch.no_grad()
    def update(self, seed: int, g: float, lr: float, wd: float) -> None:
        """The step's update, master -= lr * (g * z + wd * master) (no weight decay on an adapter
        tensor that is not a matrix, as for the base model's biases and norms)."""
        z = self._z(seed)
        decay = {n: len(self.shapes[n]) >= 2 for n in self.names}
        if len(set(decay.values())) == 1:  # (LoRA: matrices only) one pass, the same bits as one per tensor
            apply_update(self.master, z, g, lr, wd, decay[self.names[0]])
            return
        for name in self.names:
            apply_update(self.view(self.master, name), self.view(z, name), g, lr, wd, decay[name])

    @torch.no_grad()
    def perturb(self, seed: int, eps: float) -> None:
        """Each branch's copy := master + s * eps * z, z drawn once."""
        z = self._z(seed)
        for s, copy in self.copies.items():
            torch.add(self.master, z, alpha=s * eps, out=copy)

    def select(self, sign: int | None) -> None:
        """The forward reads branch ``sign``'s copy, or the master (None)."""
        self.current = self.master if sign is None else self.copies[sign]

    def replay(self, rows: Iterable[dict]) -> None:
        """Journal lines applied in order (a resumed run's steps after its snapshot)."""
        for row in rows:
            if not row.get("skipped"):
                self.update(
                    int(row["seed"]), float(row["projected_grad"]), float(row["lr"]), float(row["weight_decay"])
                )

    def load(self, directory: Path) -> None:
        """The master from a saved adapter (a snapshot's)."""
        from safetensors.torch import load_file

        saved = load_file(str(directory / ADAPTER_WEIGHTS))
        missing = [n for n in self.names if n not in saved]
        if missing or len(saved) != len(self.names):
            raise ZoplanError(f"{directory / ADAPTER_WEIGHTS} is not this run's adapter (missing {missing[:3]})")
        with torch.no_grad():
            for name in self.names:
                self.view(self.master, name).copy_(saved[name])

    def save(self, target: Path, model_dir: Path) -> None:
        """PEFT's layout in ``target``, with the base model's tokenizer files (its config stays
        with it: the adapter's names the base model's directory), readable as the umask says."""
        from safetensors.torch import save_file

        from zoplan.runtime.checkpoint import companion_files, readable_as_umask

        target.mkdir(parents=True, exist_ok=True)
        state = {n: t.detach().to("cpu").clone() for n, t in self.tensors().items()}
        save_file(state, str(target / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (target / ADAPTER_CONFIG).write_text(json.dumps(self.peft_config(model_dir.resolve()), indent=2) + "\n")
        for f in companion_files(model_dir):
            if f.name not in ("config.json", "generation_config.json"):
                shutil.copy2(f, target / f.name)
        readable_as_umask(target)

    def peft_config(self, model_dir: Path) -> dict:
        raise NotImplementedError


class LoRA(Tuned):
    """LoRA on every block's query and value projections (module docstring)."""

    def __init__(self, model: nn.Module, family: Adapter, tuning: Tuning, seed: int, device, signs) -> None:
        self.rank, self.alpha = tuning.lora_rank, tuning.lora_alpha
        self.scale = tuning.lora_alpha / tuning.lora_rank
        self.modules: list[tuple[nn.Linear, str, str]] = []  # (projection, A's name, B's name)
        shapes: list[tuple[str, tuple[int, ...]]] = []
        for i, block in enumerate(family.blocks(model)):
            for target in LORA_TARGETS:
                path, module = _find(block, target, i)
                stem = f"{PEFT_PREFIX}{family.blocks_path}.{i}.{path}"
                a, b = f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"
                shapes += [(a, (self.rank, module.in_features)), (b, (module.out_features, self.rank))]
                self.modules.append((module, a, b))
        super().__init__(shapes, device, signs)
        with torch.no_grad():  # A uniform in +-1/sqrt(in), the same on every rank; B zero
            for module, a, _ in self.modules:
                gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(a.encode())) % 2**63)
                bound = 1.0 / module.in_features**0.5
                draw = torch.rand(self.shapes[a], generator=gen, dtype=torch.float32) * (2 * bound) - bound
                self.view(self.master, a).copy_(draw)
        self.handles = [m.register_forward_hook(self._hook(a, b)) for m, a, b in self.modules]

    def _hook(self, a: str, b: str):
        def add_lora(module, args, output):
            x = args[0]
            A, B = self.view(self.current, a), self.view(self.current, b)
            return output + (F.linear(F.linear(x.to(A.dtype), A), B) * self.scale).to(output.dtype)

        return add_lora

    def peft_config(self, model_dir: Path) -> dict:
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": str(model_dir),
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "target_modules": list(LORA_TARGETS),
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
        }


def _find(block: nn.Module, target: str, i: int) -> tuple[str, nn.Linear]:
    for path, module in block.named_modules():
        if path.rsplit(".", 1)[-1] == target and isinstance(module, nn.Linear):
            return path, module
    raise ZoplanError(f"block {i} has no linear module named {target} for LoRA")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def build(model: nn.Module, family: Adapter, tuning: Tuning, seed: int, device, signs) -> Tuned | None:
    """The adapter a plan trains on ``model``, or None for full-parameter training."""
    if tuning.method == Method.LORA:
        return LoRA(model, family, tuning, seed, device, signs)
    if tuning.method != Method.FULL:  # zoplan.runtime.launch.check_runnable refuses it first
        raise ZoplanError(f"the runtime does not train {tuning.describe()}")
    return None

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

Prefix (``Prefix``): ``tokens`` trained keys and values per block, which every position's attention
reads before the sequence's own (MeZO's prefix tuning, no reparameterisation; PEFT's
``PREFIX_TUNING`` with the same numbers). They are taken as the attention's keys and values are
cached (after the rotary embedding), one tensor ``prompt_embeddings`` of ``tokens x (blocks * 2 *
kv_heads * head_dim)`` in PEFT's order. The sequence's positions start after the prefix, as with
PEFT's. They start as the keys and values of ``tokens`` random vocabulary tokens run through the
base model (MeZO's initialisation from real activations): at step 0 the model reads those tokens
before every input. A run computes them once on every rank from the host copy, and keeps them in
the run's directory (``PREFIX_INIT``) for ``--resume`` and ``zoplan replay``. A forward pre-hook
on every block hands its attention the block's prefix in place of the model's key-value cache;
the model's own forward makes the masks and positions, told of the prefix by a cache of its
length (``model_inputs``). Loads with ``PeftModel.from_pretrained(base, DIR)``.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
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
PROMPT = "prompt_embeddings"  # PEFT's name for a prefix's keys and values
PREFIX_INIT = "prefix-init.safetensors"  # a prefix run's initial values, in its output directory


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

    def model_inputs(self, inputs: dict) -> dict:
        """The model's forward arguments for a batch (a prefix adds its length to them)."""
        return inputs

    def initialise(
        self,
        run_dir: Path,
        forward: Callable[[dict], None],
        is_writer: bool,
        saved: bool,
        agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """Initial values that depend on the base model (LoRA's do not: they are drawn when made);
        ``agree`` gives every rank rank 0's values of what this rank computed."""

    def load_initial(self, run_dir: Path) -> None:
        """The initial values a run kept in its directory, where they depend on the base model."""


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


class Prefix(Tuned):
    """Trained keys and values read before every sequence's own, in every block (module docstring)."""

    def __init__(self, model: nn.Module, family: Adapter, tuning: Tuning, seed: int, device, signs) -> None:
        config = model.config
        blocks = family.blocks(model)
        self.tokens, self.layers = tuning.prefix_tokens, len(blocks)
        self.heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.vocab, self.seed = config.vocab_size, seed
        super().__init__([(PROMPT, (self.tokens, self.layers * 2 * self.heads * self.head_dim))], device, signs)
        # the model's name for its key-value cache argument (``cache`` since transformers 5)
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.captured: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.handles = [b.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, b in enumerate(blocks)]

    def _split(self, flat: torch.Tensor) -> torch.Tensor:
        """[tokens, blocks, key or value, heads, head_dim]: PEFT's order of ``prompt_embeddings``."""
        return flat.view(self.tokens, self.layers, 2, self.heads, self.head_dim)

    def kv(self, i: int, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i's prefix keys and values as its attention caches them: [batch, heads, tokens, head_dim]."""
        parts = self._split(self.current)[:, i]
        return tuple(  # type: ignore[return-value]
            parts[:, kv].transpose(0, 1).unsqueeze(0).expand(batch, -1, -1, -1).to(dtype) for kv in (0, 1)
        )

    def _hook(self, i: int):
        def hand_prefix(module, args, kwargs):
            from transformers.cache_utils import Cache

            # (the model's cache, or what this hook put in its place on an earlier call with these kwargs)
            names = [k for k, v in kwargs.items() if isinstance(v, (Cache, _PrefixKV, _Capture))]
            if not names:
                import transformers

                raise ZoplanError(
                    f"prefix tuning needs a model whose attention reads a key-value cache object; block {i} of this "
                    f"{type(module).__name__} (transformers {transformers.__version__}) was given none",
                    fix="use --tuning lora, or a newer transformers",
                )
            kwargs = dict(kwargs)
            kwargs[names[0]] = _Capture(self.captured) if self.captured is not None else _PrefixKV(self, i)
            return args, kwargs

        return hand_prefix

    def model_inputs(self, inputs: dict) -> dict:
        """A batch's arguments with the prefix counted: its columns in the attention mask, the
        positions after it, and a cache of its length (zeros, for the first block only: the
        forward reads the length there, and each block is handed its own prefix)."""
        from transformers.cache_utils import DynamicCache

        ids = inputs["input_ids"]
        batch, length = ids.shape
        out = dict(inputs)
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=ids.device)
        out["attention_mask"] = torch.cat(
            [torch.ones(batch, self.tokens, dtype=mask.dtype, device=ids.device), mask], 1
        )
        positions = inputs.get("position_ids")
        if positions is None:
            positions = torch.arange(length, device=ids.device).unsqueeze(0).expand(batch, -1)
        out["position_ids"] = positions + self.tokens
        cache = DynamicCache()  # (its first block's length is what the model's forward reads)
        zeros = torch.zeros(1, self.heads, self.tokens, self.head_dim, device=ids.device).expand(batch, -1, -1, -1)
        cache.update(zeros, zeros, 0)
        out[self.cache_arg] = cache
        return out

    def init_tokens(self) -> torch.Tensor:
        """The random vocabulary tokens whose keys and values the prefix starts as: [1, tokens]."""
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(PROMPT.encode())) % 2**63)
        return torch.randint(self.vocab, (1, self.tokens), generator=gen)

    @contextmanager
    def capturing(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """While open, each block's attention records its keys and values (in order) instead of
        reading the prefix: run the base model's forward on ``capture_inputs()`` inside."""
        self.captured = []
        try:
            yield self.captured
        finally:
            self.captured = None

    def capture_inputs(self) -> dict:
        from transformers.cache_utils import DynamicCache

        return {"input_ids": self.init_tokens().to(self.device), self.cache_arg: DynamicCache()}

    @torch.no_grad()
    def set_from(self, kvs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The master from every block's captured keys and values ([1, heads, tokens, head_dim])."""
        if len(kvs) != self.layers:
            raise ZoplanError(f"the prefix's initial pass saw {len(kvs)} blocks, the model has {self.layers}")
        parts = self._split(self.master)
        for i, (k, v) in enumerate(kvs):
            parts[:, i, 0].copy_(k[0].transpose(0, 1))
            parts[:, i, 1].copy_(v[0].transpose(0, 1))

    def initialise(
        self,
        run_dir: Path,
        forward: Callable[[dict], None],
        is_writer: bool,
        saved: bool,
        agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """From the run's saved initial values (``saved``: the writer found them before the run
        started), else by one pass of the base model over the initial tokens (one thread on a CPU:
        the sums of a pass depend on how many share it), then rank 0's values on every rank
        (``agree``: machines of other makes sum otherwise), saved by the writer."""
        from safetensors.torch import save_file

        if saved:
            self.load_initial(run_dir)
            return
        path = run_dir / PREFIX_INIT
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with self.capturing() as kvs:
                forward(self.capture_inputs())
        finally:
            torch.set_num_threads(threads)
        self.set_from(kvs)
        if agree is not None:
            values = self.view(self.master, PROMPT)
            with torch.no_grad():
                values.copy_(agree(values.to("cpu").clone()))
        if is_writer:
            tmp = path.with_name(path.name + ".tmp")
            save_file({PROMPT: self.view(self.master, PROMPT).to("cpu").clone()}, str(tmp))
            from zoplan.runtime.checkpoint import readable_as_umask

            readable_as_umask(tmp)  # (safetensors writes 0600)
            os.replace(tmp, path)

    def load_initial(self, run_dir: Path) -> None:
        """The initial values the run saved in its directory."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = run_dir / PREFIX_INIT
        try:
            saved = load_file(str(path))[PROMPT]
        except (OSError, KeyError, SafetensorError) as exc:
            raise ZoplanError(
                f"cannot read the prefix's initial values from {path}: {exc}",
                fix="keep the run's directory whole (its journal, plan.yaml and prefix-init.safetensors)",
            ) from None
        if saved.numel() != self.numel:
            raise ZoplanError(f"{path} holds {saved.numel()} values, this run's prefix has {self.numel}")
        with torch.no_grad():
            self.master.copy_(saved.reshape(-1))

    def peft_config(self, model_dir: Path) -> dict:
        dim = self.heads * self.head_dim
        return {
            "peft_type": "PREFIX_TUNING",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": str(model_dir),
            "num_virtual_tokens": self.tokens,
            "token_dim": dim,
            "num_transformer_submodules": 1,
            "num_attention_heads": self.heads,
            "num_layers": self.layers,
            "encoder_hidden_size": dim,
            "prefix_projection": False,
            "inference_mode": True,
        }


class _PrefixKV:
    """Stands in for the key-value cache of one block's attention: its prefix, then the sequence."""

    def __init__(self, prefix: Prefix, i: int) -> None:
        self.prefix, self.i = prefix, i

    def update(self, key: torch.Tensor, value: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.prefix.kv(self.i, key.shape[0], key.dtype)
        return torch.cat([k, key], dim=-2), torch.cat([v, value], dim=-2)


class _Capture:
    """Stands in for a block's key-value cache and records what its attention would cache."""

    def __init__(self, into: list) -> None:
        self.into = into

    def update(self, key: torch.Tensor, value: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        self.into.append((key.detach().float().clone(), value.detach().float().clone()))
        return key, value


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
    if tuning.method == Method.PREFIX:
        return Prefix(model, family, tuning, seed, device, signs)
    return None

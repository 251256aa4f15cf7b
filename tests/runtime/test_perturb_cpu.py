"""The CPU kernels of ``zoplan.runtime.perturb_cpu`` against the torch path of ``perturb``, bit for bit.

The torch path (``ZOPLAN_Z_KERNEL=torch``) is the reference: z, the perturbed weights and the
updates the engine and replay compute with it must not change by one bit when the compiled kernel
serves them instead. Comparisons are of the bits (``torch.equal`` would take -0.0 for 0.0).
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from zoplan.runtime import perturb as P  # noqa: E402
from zoplan.runtime import perturb_cpu as C  # noqa: E402
from zoplan.runtime.hostcopy import BlockLayout, Slot  # noqa: E402
from zoplan.runtime.zo import apply_update, fused_kernels, layout_table, update_range, update_tensor  # noqa: E402

# Where a C compiler is installed the kernel must build and pass its check: not available there
# fails every test below rather than skipping them.
_CC = shlex.split(os.environ.get("ZOPLAN_CC") or os.environ.get("CC") or "cc")[0]
pytestmark = pytest.mark.skipif(
    shutil.which(_CC) is None, reason=f"no C compiler ({_CC}): the torch path serves the CPU"
)

NAME = "model.layers.0.mlp.fc1.weight"
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
_INT = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT[t.dtype])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


@pytest.fixture
def torch_path(monkeypatch: pytest.MonkeyPatch):
    """Runs a function on the torch path: ``torch_path(fn, *args)``."""

    def run(fn, *args, **kwargs):
        with monkeypatch.context() as m:
            m.setenv("ZOPLAN_Z_KERNEL", "torch")
            assert P.fused_backend("cpu") is None
            return fn(*args, **kwargs)

    return run


def test_the_cpu_backend_serves_cpu_tensors_unless_the_torch_path_is_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    assert C.available()
    monkeypatch.delenv("ZOPLAN_Z_KERNEL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert P.fused_backend("cpu") is C and fused_kernels(torch.zeros(2)) is C
    monkeypatch.setenv("ZOPLAN_Z_KERNEL", "torch")
    assert P.fused_backend("cpu") is None and fused_kernels(torch.zeros(2)) is None
    assert all(callable(getattr(C, name)) for name in P._FUSED_INTERFACE)  # the runtime's interface


def _ranges(rng: random.Random, chunk: int) -> list[tuple[int, int, int]]:
    """(seed, start, count): counts around multiples of 8, 16 and the chunk, starts at 0, inside
    the first word, across 2**32 and 5 * 2**32, and just below 2**63."""
    out = []
    for _ in range(24):
        count = rng.choice([1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 1000, chunk - 1, chunk, chunk + 1, 2 * chunk + 13])
        start = rng.choice([0, rng.randrange(1, 2**20), 2**32 - rng.randrange(1, count + 2), 5 * 2**32 - 3])
        out.append((rng.choice([0, 1234, 2**63 - 1, -5, rng.randrange(2**64)]), start, count))
    out.append((7, 2**63 - 40, 40))
    return out


@pytest.mark.parametrize("chunk", [64, C.CHUNK])
def test_z_equals_the_torch_path(chunk: int, torch_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(C, "CHUNK", chunk)  # small chunks: many chunk boundaries inside short draws
    rng = random.Random(chunk)
    for seed, start, count in _ranges(rng, chunk):
        dtype = rng.choice(DTYPES)
        want = torch_path(P.normal, seed, NAME, start, count, dtype=dtype)
        got = P.normal(seed, NAME, start, count, dtype=dtype)
        assert _same(got, want), (seed, start, count, dtype)
    # the words, and one slice of a draw equal to a draw of the slice
    a, b = C.stream_words(1234, NAME, 2**32 - 100, 300)
    ra, rb = P.stream_words(1234, NAME, 2**32 - 100, 300)
    assert torch.equal(a, ra) and torch.equal(b, rb)
    full = P.normal(3, NAME, 0, 5000)
    assert _same(P.normal(3, NAME, 1234, 777), full[1234:2011])


def test_golden_values_unchanged(torch_path) -> None:
    """The first values of a stream, pinned by test_perturb.py, are the torch path's bits."""
    from .test_perturb import GOLDEN_Z

    z = P.normal(1234, NAME, 0, 8)
    assert _same(z, torch_path(P.normal, 1234, NAME, 0, 8))
    assert z.tolist() == pytest.approx(GOLDEN_Z, rel=1e-6, abs=1e-6)


def test_radius_and_cosine_do_not_depend_on_the_position_in_a_chunk() -> None:
    """Why the kernel's chunks need not be the torch path's: torch's log, sqrt and cos give every
    possible u1 and angle (2**24 each) the same bits wherever the value sits in the tensor
    (vector body or tail, any length). A torch whose kernels broke this would fail here."""
    k = torch.arange(2**24, dtype=torch.int64)
    u1 = (k + 1).float().mul_(P._TWO_POW_M24)
    angle = k.float().mul_(P._ANGLE_SCALE)

    def radius(u: torch.Tensor) -> torch.Tensor:
        return u.log().mul_(-2.0).sqrt_()

    r, c = radius(u1), angle.cos()
    for shift in (1, 5, 11):
        pad = torch.full((shift,), 0.5)
        assert torch.equal(radius(torch.cat([pad, u1]))[shift:], r)
        assert torch.equal(torch.cat([pad, angle]).cos()[shift:], c)
    rng = random.Random(0)
    for length in (1, 3, 8, 15, 17, 33):
        for _ in range(20):
            s = rng.randrange(2**24 - length)
            assert torch.equal(radius(u1[s : s + length]), r[s : s + length])
            assert torch.equal(angle[s : s + length].cos(), c[s : s + length])


def test_normal_parts_equal_the_torch_path(torch_path) -> None:
    sizes = [4096, 64, 1, 7, 3 * 2**15 + 5, 130, 17]
    rng = random.Random(3)
    parts, pos = [], 0
    for j, count in enumerate(sizes):
        parts.append((f"model.layers.{j}.w", rng.choice([0, 11]), count, pos))
        pos += count + rng.choice([0, 3])
    parts.append(("model.layers.9.w", 2**32 - 4, 9, pos))
    want = torch.full((pos + 11,), float("nan"))
    torch_path(P.normal_parts_, want, 99, parts)
    got = torch.full((pos + 11,), float("nan"))
    P.normal_parts_(got, 99, parts)
    assert _same(got, want)  # the gaps keep their NaN bits too


@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_equals_the_torch_path(dtype: torch.dtype, torch_path) -> None:
    g = torch.Generator().manual_seed(1)
    p0 = (torch.randn(301, 517, generator=g) * 0.05).to(dtype)
    for offset, scale in ((0, 1e-3), (2**32 - 70_000, -2e-3), (12345, 0.3)):
        want, got = p0.clone(), p0.clone()
        torch_path(P.perturb_, want, 5, NAME, scale, offset=offset)
        P.perturb_(got, 5, NAME, scale, offset=offset)
        assert _same(got, want), (offset, scale)
    want, got = p0.clone().t(), p0.clone().t()  # non-contiguous: row-major order of the view
    torch_path(P.perturb_, want, 5, NAME, 1e-3)
    P.perturb_(got, 5, NAME, 1e-3)
    assert _same(got, want)


def _layout(rng: random.Random) -> BlockLayout:
    shapes = [((30, 41), True), ((41,), False), ((41,), False), ((41, 25), True), ((7,), False), ((300, 200), True)]
    slots, off = [], 0
    for k, (shape, decay) in enumerate(shapes):
        numel = 1
        for s in shape:
            numel *= s
        slots.append(Slot(f"model.layers.3.p{k}", f"p{k}", off, numel, shape, decay))
        off += numel
    return BlockLayout(3, tuple(slots), off, -(-off // 64) * 64)


def _engine_perturbed(theta: torch.Tensor, layout: BlockLayout, seed: int, eps: float) -> dict[int, torch.Tensor]:
    """The engine's torch path for a block's two branches (ZOEngine._perturbed)."""
    z = torch.zeros(layout.padded, dtype=torch.float32)
    P.normal_parts_(z, seed, [(slot.name, 0, slot.numel, slot.offset) for slot in layout.slots])
    base = theta.float()
    return {s: (base + (s * eps) * z).to(theta.dtype) for s in (1, -1)}


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_blocks_perturbation_and_update_equal_the_engines_torch_path(dtype: torch.dtype, torch_path) -> None:
    layout = _layout(random.Random(0))
    theta = (torch.randn(layout.padded, generator=torch.Generator().manual_seed(2)) * 0.05).to(dtype)
    for seed, eps in ((17, 1e-3), (2**63 - 1, 3.3e-4)):
        want = torch_path(_engine_perturbed, theta, layout, seed, eps)
        plus, minus = torch.zeros_like(theta), torch.zeros_like(theta)
        table = layout_table(C, layout, 0, layout.numel, theta.device)
        C.perturbed_block_into([plus, minus], theta, table, seed, [eps, -eps])
        n = layout.numel
        assert _same(plus[:n], want[1][:n]) and _same(minus[:n], want[-1][:n]), seed
        assert not plus[n:].any()  # outside the ranges: untouched
        one = theta.clone()
        C.perturbed_block_into([one], one, table, seed, [-eps])  # in place, the output aliasing base
        assert _same(one[:n], want[-1][:n])
    for start, end in (
        (0, layout.numel),
        (layout.padded // 4, 2 * layout.padded // 4),
        (3 * layout.padded // 4, layout.padded),
        (1234, 1300),
    ):
        for g, lr, wd in ((2.5, 1e-3, 0.1), (-0.37, 3e-5, 0.0), (1e7, 1e-9, 1e-2)):
            want, got = theta.clone(), theta.clone()
            torch_path(update_range, want, layout, start, end, 11, g, lr, wd)
            update_range(got, layout, start, end, 11, g, lr, wd)
            assert _same(got, want), (start, end, g, lr, wd)


@pytest.mark.parametrize("dtype", DTYPES)
def test_resident_tensors_and_replay_equal_the_torch_path(dtype: torch.dtype, torch_path) -> None:
    """The engine's resident parts (``_set_resident``, ``_update_resident``) and replay's
    ``update_tensor``: per-tensor kernels against their torch expressions."""
    g = torch.Generator().manual_seed(3)
    master = (torch.randn(123, 457, generator=g) * 0.05).to(dtype)
    for sign, eps in ((1, 1e-3), (-1, 1e-3)):
        z = torch_path(P.normal, 8, NAME, 0, master.numel()).view(master.shape)
        param = torch.empty_like(master)
        param.copy_(master.float() + (sign * eps) * z)
        got = C.perturbed_into(torch.empty_like(master), master, 8, NAME, 0, sign * eps)
        assert _same(got, param), sign
    for decay, wd in ((True, 0.1), (False, 0.1), (True, 0.0)):
        want, got = master.clone(), master.clone()
        z = torch_path(P.normal, 8, NAME, 0, master.numel()).view(master.shape)
        apply_update(want, z, 2.5, 1e-3, wd, decay)
        C.update_(got, 8, NAME, 0, 2.5, 1e-3, wd, decay)
        assert _same(got, want), (decay, wd)
        replayed = master.clone()
        update_tensor(replayed, NAME, 8, 2.5, 1e-3, wd, decay)
        assert _same(replayed, want)
    view = master.clone().t()  # non-contiguous tensors go through a row-major copy
    want = view.contiguous()
    apply_update(want, torch_path(P.normal, 8, NAME, 0, want.numel()).view(want.shape), 2.5, 1e-3, 0.1, True)
    assert _same(C.update_(view, 8, NAME, 0, 2.5, 1e-3, 0.1, True), want)


def test_axpy_and_block_words() -> None:
    x0 = torch.randn(3000, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    z = P.normal(4, NAME, 2**32 - 1000, 3000)
    assert _same(C.axpy_normal_(x0.clone(), 4, NAME, 2**32 - 1000, 1e-3), (x0.float() + 1e-3 * z).to(torch.bfloat16))
    parts = [("a", 0, 10, 3, True), ("b", 2**32 - 4, 9, 20, False), ("c", 5, 0, 40, True)]
    table = C.block_table(parts)
    assert (table.end, table.numel, table.nrows) == (29, 19, 3)
    a, b = C.block_words(table, 9, 31)
    for name, first, count, pos, _ in parts[:2]:
        ra, rb = P.stream_words(9, name, first, count)
        assert torch.equal(a[pos : pos + count], ra) and torch.equal(b[pos : pos + count], rb)
    assert not a[:3].any() and not a[13:20].any() and not a[29:].any()


def test_bad_arguments_are_refused() -> None:
    table = C.block_table([("a", 0, 10, 5, True)])
    with pytest.raises(ValueError, match="reaches 15"):
        C.update_block_(torch.zeros(14), table, 1, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="1-D contiguous"):
        C.update_block_(torch.zeros(20, 2).t(), table, 1, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="only outs"):
        base = torch.zeros(15)
        C.perturbed_block_into([torch.zeros(15), base], base, table, 1, [1.0, -1.0])
    with pytest.raises(TypeError):
        C.update_(torch.zeros(15, dtype=torch.int32), 1, "a", 0, 1.0, 1.0, 0.0, False)
    with pytest.raises(ValueError):
        C.block_table([("a", 2**63 - 1, 2, 0, False)])


_CHILD = """
import json, torch
from zoplan.runtime import perturb as P
z = torch.cat([P.normal(1234, {name!r}, 2**32 - 50, 100), P.normal(5, {name!r}, 0, 3000)])
x = torch.linspace(-1, 1, 3000)
P.perturb_(x, 5, {name!r}, 1e-3)
print(json.dumps([P.fused_backend("cpu") is not None, z.view(torch.int32).tolist(), x.view(torch.int32).tolist()]))
"""


def _child_values(torch_path) -> list:
    """What _CHILD prints, computed here on the torch path."""
    z = torch_path(lambda: torch.cat([P.normal(1234, NAME, 2**32 - 50, 100), P.normal(5, NAME, 0, 3000)]))
    x = torch.linspace(-1, 1, 3000)
    torch_path(P.perturb_, x, 5, NAME, 1e-3)
    return [z.view(torch.int32).tolist(), x.view(torch.int32).tolist()]


def _child(cache: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(name=NAME)],
        env={**os.environ, "XDG_CACHE_HOME": str(cache), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_without_a_compiler_the_torch_path_gives_the_same_values(tmp_path: Path, torch_path) -> None:
    proc = _child(tmp_path, ZOPLAN_CC=str(tmp_path / "no-such-cc"))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    fused, *values = json.loads(out)
    assert fused is False and values == _child_values(torch_path)
    notices = [line for line in err.splitlines() if line.startswith("zoplan:")]
    assert len(notices) == 1 and "no-such-cc" in notices[0] and "torch path" in notices[0], err
    assert not (tmp_path / "zoplan" / "kernels").exists()


def test_a_compiler_that_fails_is_said_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A compiler that runs but cannot build the file (every target tried): no library is left in
    the cache, and the reason, compiler messages of several lines included, is one line."""
    cc = tmp_path / "bad-cc"
    cc.write_text(
        '#!/bin/sh\ncase "$*" in *-dM*) exit 0;; esac\necho "error: one" >&2\necho "error: two" >&2\nexit 1\n'
    )
    cc.chmod(0o755)
    monkeypatch.setenv("ZOPLAN_CC", str(cc))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="compiling perturb_cpu.c failed") as failed:
        C._build()
    assert list((tmp_path / "cache" / "zoplan" / "kernels").iterdir()) == []  # no temporary file left
    C._notice(str(failed.value))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: one | error: two" in err and err.startswith("zoplan: ")


def test_two_processes_building_the_kernel_at_once(tmp_path: Path, torch_path) -> None:
    procs = [_child(tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    want = _child_values(torch_path)
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err
        fused, *values = json.loads(out)
        assert fused is True and values == want
        assert "zoplan:" not in err
    built = sorted(p.name for p in (tmp_path / "zoplan" / "kernels").iterdir())
    assert len(built) == 1 and built[0].endswith(".so"), built  # one whole library, no temporary left


def test_a_run_with_the_cpu_kernel_is_the_torch_paths_run_bit_for_bit(
    tiny_dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`zoplan run` on the CPU, the compiled kernel against the torch path: the same journal (losses
    at θ ± εz, projected gradients) and the same trained weights, to the bit. Two ranks, blocks
    sliced between them: each updates its slices (update_range over sub-ranges), the compute rank
    perturbs whole blocks to both signs and the resident parts tensor by tensor."""
    from zoplan.planfile import load_plan, write_plan

    from .test_layouts import cpu_topology, planned, train

    pins = dict(perturbation=1, data=1, gpus=("rank0",), upload="sliced", movers="all", slices=2)
    plan_path = planned(tmp_path, tiny_dirs["tiny-opt"], cpu_topology(tmp_path, 2), "sliced", **pins)
    the_plan = load_plan(plan_path)  # weight decay on: the update's two forms both run
    write_plan(the_plan.model_copy(update={"zo": the_plan.zo.model_copy(update={"weight_decay": 0.1})}), plan_path)
    fused = train(plan_path, tiny_dirs["tiny-opt"], tmp_path / "fused", steps=3)
    with monkeypatch.context() as m:
        m.setenv("ZOPLAN_Z_KERNEL", "torch")
        reference = train(plan_path, tiny_dirs["tiny-opt"], tmp_path / "torch", steps=3)
    journals = [(tmp_path / run / "journal.jsonl").read_text().splitlines() for run in ("fused", "torch")]
    lines = [[{k: v for k, v in json.loads(line).items() if "time" not in k} for line in j] for j in journals]
    assert len(lines[0]) == 3 and lines[0] == lines[1]
    assert lines[0][-1]["weight_decay"] == 0.1 and lines[0][-1]["projected_grad"] != 0.0
    logs = [(tmp_path / run / "worker-node0.log").read_text() for run in ("fused", "torch")]
    assert "perturbation kernels: torch" not in logs[0] and "perturbation kernels: torch" in logs[1]
    assert fused.keys() == reference.keys()
    for name in fused:
        assert _same(fused[name], reference[name]), name

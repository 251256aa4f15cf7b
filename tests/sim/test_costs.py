"""The cost model's charge for the runtime's own work (zoplan.sim.costs): tensor ops, z drawn into
memory, collective calls and the loop's host work, from a device's figures in the topology."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from zoplan.sim.costs import StepCosts, Workload, elementwise_s, forward_s
from zoplan.layout import Layout
from zoplan.models import ROWS_TABLE_MIN, RUNTIME_OPS, TINY_SHAPES, load_model_shape
from zoplan.sim import simulate
from zoplan.topology import load_topology

CPU_LOCAL = Path(__file__).resolve().parents[2] / "topologies" / "cpu-local.yaml"
RUNTIME_KEYS = ("op_us", "cold_op_us", "z_ns", "z_call_us", "z_cold_us", "collective_us", "collective_gbps", "loop_us")


def cpu_machine(tmp_path: Path, **figures: float | str):
    """cpu-local with its rank's runtime and lockstep figures replaced (the others omitted: 0, and
    lockstep 1)."""
    spec = yaml.safe_load(CPU_LOCAL.read_text())
    rank = spec["gpu_models"]["cpu-rank"]
    for key in (*RUNTIME_KEYS, "lockstep", "lockstep_wait_us"):
        rank.pop(key, None)
    rank.update(figures)
    path = tmp_path / f"cpu-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_topology(path)


def layout(pertp: int = 1, data: int = 1, micro_batch: int = 2) -> Layout:
    gpus = ("rank0", "rank1")[: pertp * data]
    return Layout(
        perturbation=pertp,
        data=data,
        compute_gpus=gpus,
        upload="sliced",
        movers=("rank0", "rank1"),
        slices_per_block=2,
        wire_dtype="fp32",
        param_dtype="fp32",
        micro_batch=micro_batch,
        prefetch=1,
    )


OPT = load_model_shape("opt-125m")
WORK = Workload(OPT, 4, 64)


def test_every_bundled_gpu_leaves_the_runtime_figures_at_zero() -> None:
    """The GPU presets fuse z into their kernels and overlap launches: their plans do not change."""
    from zoplan.topology import bundled_names

    for name in bundled_names():
        machine = load_topology(name)
        for g in machine.gpus:
            gm = machine.gpu_model(g)
            if gm.kind == "gpu":
                assert all(getattr(gm, key) == 0 for key in RUNTIME_KEYS), (name, g)


def test_the_bundled_cpu_machine_has_every_runtime_figure() -> None:
    gm = load_topology("cpu-local").gpu_model("rank0")
    assert all(getattr(gm, key) > 0 for key in RUNTIME_KEYS)


def test_a_z_that_costs_time_adds_its_calls_and_elements_to_the_fused_pass(tmp_path: Path) -> None:
    """A block's perturbation draws z of the whole block in one fused call (zoplan.runtime.
    perturb_cpu): per element z_ns and per call z_call_us on top of the pass, which reads theta
    and writes one buffer per branch (a GPU's pass also counts the restore of whole blocks)."""
    base = StepCosts(cpu_machine(tmp_path), WORK, layout())
    drawn = StepCosts(cpu_machine(tmp_path, z_ns=20.0, z_call_us=300.0), WORK, layout())
    n = OPT.block_params()
    z = 300e-6 + n * 20e-9
    gm = base._gm("rank0")
    passes = layout().branches_per_gpu - base.perturb_passes()
    assert drawn.block_forward_s("rank0") - base.block_forward_s("rank0") == pytest.approx(
        z + elementwise_s(gm, n, "fp32", passes), rel=1e-9
    )
    # the mover's update of its slice: one fused call over the slice, one pass as without z
    s = base.slice_params
    assert drawn.update_slice_s("rank0") - base.update_slice_s("rank0") == pytest.approx(300e-6 + s * 20e-9, rel=1e-9)


def test_each_operation_that_draws_z_pays_one_cold_call(tmp_path: Path) -> None:
    """The first z call of an operation of a step comes right after other work (a block's
    forward): z_cold_us once per block perturbation, per update (a mover's slice, a compute
    rank's whole block), per embedding stage and per head stage, however many calls follow."""
    for lay, work in (
        (layout(), WORK),
        (dataclasses.replace(layout(), upload="whole", movers=("rank0",), slices_per_block=1), WORK),
        (layout(), Workload(dataclasses.replace(OPT, vocab=1000), 4, 64)),  # a small table: set whole
    ):
        base = StepCosts(cpu_machine(tmp_path, z_ns=1e-9, z_call_us=10.0), work, lay)
        cold = StepCosts(cpu_machine(tmp_path, z_ns=1e-9, z_call_us=10.0, z_cold_us=70.0), work, lay)
        methods = ["block_forward_s", "embed_s", "head_s"]
        methods.append("whole_update_s" if lay.upload == "whole" else "update_slice_s")
        for method in methods:
            extra = getattr(cold, method)("rank0") - getattr(base, method)("rank0")
            assert extra == pytest.approx(70e-6, rel=1e-9), (lay.upload, method)
    # where z is free next to the pass (a GPU: z_ns 0), nothing is cold
    free = StepCosts(cpu_machine(tmp_path, z_cold_us=70.0), WORK, layout())
    assert free.block_forward_s("rank0") == StepCosts(cpu_machine(tmp_path), WORK, layout()).block_forward_s("rank0")


def test_a_cpu_head_adds_the_writing_of_its_logits_to_its_product(tmp_path: Path) -> None:
    """On a CPU rank the LM head's product and the writing of its logits add up (SPILL_BYTES
    a logit at the copy rate), then the loss (its passes: the test above)."""
    from zoplan.sim.costs import SPILL_BYTES, cpu_block_s

    machine = cpu_machine(tmp_path)
    gm = machine.gpu_model("rank0")
    bandwidth = gm.hbm_gbps * 1e9
    for micro_batch in (1, 2):
        lay = layout(micro_batch=micro_batch)
        c = StepCosts(machine, WORK, lay)
        logits = micro_batch * WORK.seq_len * OPT.vocab
        tokens = micro_batch * WORK.seq_len
        product = cpu_block_s(gm, OPT.head_flops(tokens), OPT.embed_dim * OPT.vocab * 4, 0.0, "fp32", 0, tokens=tokens)
        head = (product + logits * SPILL_BYTES / bandwidth + c.loss_s("rank0")) * c.micro_batches
        assert c.head_s("rank0") == pytest.approx(head * lay.branches_per_gpu, rel=1e-9)


def test_logits_that_fit_a_cpu_ranks_cache_are_not_written_out(tmp_path: Path) -> None:
    """cache_mib: a micro-batch's fp32 logits that fit the rank's cache do not pay SPILL_BYTES;
    one byte more than the cache and they do (the loss after them costs the same either way)."""
    from zoplan.sim.costs import SPILL_BYTES

    lay = layout()  # micro-batch 2 x 64 tokens
    logits = lay.micro_batch * WORK.seq_len * OPT.vocab
    fits = logits * 4 / 2**20  # MiB: the logits just fit
    calls = StepCosts(cpu_machine(tmp_path), WORK, lay).micro_batches * lay.branches_per_gpu
    inside = StepCosts(cpu_machine(tmp_path, cache_mib=fits), WORK, lay)
    outside = StepCosts(cpu_machine(tmp_path, cache_mib=fits - 1e-6), WORK, lay)
    bandwidth = inside._gm("rank0").hbm_gbps * 1e9
    extra = outside.head_s("rank0") - inside.head_s("rank0")
    assert extra == pytest.approx(calls * logits * SPILL_BYTES / bandwidth, rel=1e-9)
    assert outside.loss_s("rank0") == inside.loss_s("rank0")
    # without a cache figure (0) every head pays them
    assert StepCosts(cpu_machine(tmp_path, cache_mib=0.0), WORK, lay).head_s("rank0") == outside.head_s("rank0")


def test_a_blocks_product_outputs_beyond_the_cache_are_written_out(tmp_path: Path) -> None:
    """cache_mib for a CPU rank's block: each product whose fp32 output (over the micro-batch's
    tokens) outgrows the cache pays SPILL_BYTES an element; with a cache between OPT's hidden-wide
    and ffn-wide outputs only fc1's spills."""
    from zoplan.sim.costs import SPILL_BYTES

    lay = layout()
    tokens = lay.micro_batch * WORK.seq_len
    assert OPT.block_product_outputs() == (OPT.hidden,) * 4 + (OPT.ffn, OPT.hidden)
    llama = load_model_shape("llama-3-8b")  # grouped-query attention, SwiGLU
    assert llama.block_product_outputs() == (4096, 1024, 1024, 4096, 14336, 14336, 4096)

    def block(cache_mib: float) -> float:
        return StepCosts(cpu_machine(tmp_path, cache_mib=cache_mib), WORK, lay).forward_block_s("rank0")

    calls = StepCosts(cpu_machine(tmp_path), WORK, lay).micro_batches * lay.branches_per_gpu
    bandwidth = cpu_machine(tmp_path).gpu_model("rank0").hbm_gbps * 1e9
    fits = block(1e6)  # every output fits
    hidden_mib, ffn_mib = (n * tokens * 4 / 2**20 for n in (OPT.hidden, OPT.ffn))
    only_fc1 = block((hidden_mib + ffn_mib) / 2)
    every = block(0.0)
    assert only_fc1 - fits == pytest.approx(calls * OPT.ffn * tokens * SPILL_BYTES / bandwidth, rel=1e-9)
    assert every - fits == pytest.approx(
        calls * sum(OPT.block_product_outputs()) * tokens * SPILL_BYTES / bandwidth, rel=1e-9
    )


def test_a_cpu_ranks_products_run_slower_over_few_tokens(tmp_path: Path) -> None:
    """matmul_half_tokens: over M tokens a CPU rank's matrix products run at M / (M + half) of
    its rate, in its blocks and its head; 0 (every GPU preset) leaves the rate whatever the rows."""
    from zoplan.sim.costs import matmul_rate

    gm = load_topology("cpu-local").gpu_model("rank0")
    assert gm.matmul_half_tokens > 0
    half = gm.matmul_half_tokens
    assert matmul_rate(gm, "fp32", 128) == pytest.approx(matmul_rate(gm, "fp32") * 128 / (128 + half), rel=1e-12)
    plain = StepCosts(cpu_machine(tmp_path, matmul_half_tokens=0.0), WORK, layout())
    slow = StepCosts(cpu_machine(tmp_path, matmul_half_tokens=3 * 128.0), WORK, layout())
    tokens = layout().micro_batch * WORK.seq_len
    assert tokens == 128
    calls = plain.micro_batches * layout().branches_per_gpu
    rate = matmul_rate(plain._gm("rank0"), "fp32")
    # a fourth of the rate: three more times the FLOPs' time (OPT-125m's blocks and head are
    # bound by their FLOPs at 128 tokens, not by their weights)
    for method, flops in (
        ("forward_block_s", OPT.block_flops(tokens, WORK.seq_len)),
        ("head_s", OPT.head_flops(tokens)),
    ):
        extra = getattr(slow, method)("rank0") - getattr(plain, method)("rank0")
        assert extra == pytest.approx(calls * 3 * flops / rate, rel=1e-9), method
    dgx = load_topology("dgx-a100").gpu_model("gpu0")
    assert dgx.matmul_half_tokens == 0 and matmul_rate(dgx, "bf16", 1) == matmul_rate(dgx, "bf16")


def test_resident_parameters_draw_z_tensor_by_tensor(tmp_path: Path) -> None:
    """The embedding stage updates the resident parameters (one z call per tensor), then for each
    branch sets the small ones and draws the looked-up rows of the token table (one call a
    micro-batch); each branch's head sets the output projection, all but the first the small
    ones again: the runtime's calls (runtime/engine.py), each call's fixed cost counted once."""
    lay = layout()
    one = StepCosts(cpu_machine(tmp_path, z_ns=1e-9, z_call_us=100.0), WORK, lay)
    two = StepCosts(cpu_machine(tmp_path, z_ns=1e-9, z_call_us=200.0), WORK, lay)
    tensors = len(OPT.resident_tensors())
    small = tensors - (1 if OPT.tied_head else 2)  # but the token table and the output projection
    branches = lay.branches_per_gpu
    calls = tensors + branches * (small + one.micro_batches)
    assert two.embed_s("rank0") - one.embed_s("rank0") == pytest.approx(calls * 100e-6, rel=1e-6)
    assert two.head_s("rank0") - one.head_s("rank0") == pytest.approx(
        (branches + (branches - 1) * small) * 100e-6, rel=1e-6
    )
    assert sum(OPT.resident_tensors()) == OPT.resident_params()
    # a table under ROWS_TABLE_MIN is set whole with the rest, for each branch; the heads set
    # every part again for all branches but the one left in place
    small_vocab = Workload(dataclasses.replace(OPT, vocab=1000), 4, 64)
    assert 1000 * OPT.embed_dim < ROWS_TABLE_MIN
    one = StepCosts(cpu_machine(tmp_path, z_ns=1e-9, z_call_us=100.0), small_vocab, lay)
    two = StepCosts(cpu_machine(tmp_path, z_ns=1e-9, z_call_us=200.0), small_vocab, lay)
    assert two.embed_s("rank0") - one.embed_s("rank0") == pytest.approx((1 + branches) * tensors * 100e-6, rel=1e-6)
    assert two.head_s("rank0") - one.head_s("rank0") == pytest.approx((branches - 1) * tensors * 100e-6, rel=1e-6)


def test_a_cpu_rank_reads_a_blocks_weights_then_multiplies(tmp_path: Path) -> None:
    """One thread packs each product's weights out of memory, then multiplies (with its weights hot,
    as bench/matmul_tokens.py measures the rate), then runs the block's elementwise passes: a CPU
    rank's block adds the three, where a GPU takes the larger of arithmetic and memory traffic."""
    from zoplan.sim.costs import matmul_rate

    machine = cpu_machine(tmp_path)
    gm = machine.gpu_model("rank0")
    c = StepCosts(machine, WORK, layout())
    tokens = layout().micro_batch * WORK.seq_len
    weights, passes = OPT.block_params() * 4, OPT.block_pass_elements(tokens, WORK.seq_len) * 4
    one = OPT.block_flops(tokens, WORK.seq_len) / matmul_rate(gm, "fp32", tokens) + (weights + passes) / (
        gm.hbm_gbps * 1e9
    )
    assert c.threads("rank0") == 1 and gm.op_us == 0
    assert c.forward_block_s("rank0") == pytest.approx(one * c.micro_batches * layout().branches_per_gpu, rel=1e-12)


def test_a_cpu_rank_adds_its_op_issue_to_the_arithmetic_a_gpu_overlaps_it(tmp_path: Path) -> None:
    lay = layout()
    base = StepCosts(cpu_machine(tmp_path), WORK, lay)
    slow = StepCosts(cpu_machine(tmp_path, op_us=10.0), WORK, lay)
    calls = base.micro_batches * lay.branches_per_gpu
    assert slow.forward_block_s("rank0") - base.forward_block_s("rank0") == pytest.approx(
        calls * RUNTIME_OPS["opt"]["block"] * 10e-6, rel=1e-9
    )
    assert slow.head_s("rank0") - base.head_s("rank0") == pytest.approx(
        calls * RUNTIME_OPS["opt"]["head"] * 10e-6, rel=1e-9
    )

    def gpu_machine(op_us: float):
        spec = {
            "version": 1,
            "name": "g",
            "gpu_models": {"g": {"memory_gib": 80, "tflops": {"fp32": 1.0}, "hbm_gbps": 1000, "op_us": op_us}},
            "sockets": [{"id": "cpu0", "memory_gib": 512, "memory_gbps": 100}],
            "gpus": [{"id": "gpu0", "model": "g"}],
            "links": [{"a": "cpu0", "b": "gpu0", "kind": "pcie", "gbps": 25}],
        }
        path = tmp_path / f"gpu-{op_us}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return load_topology(path)

    gpu_layout = Layout(
        perturbation=1,
        data=1,
        compute_gpus=("gpu0",),
        upload="whole",
        movers=("gpu0",),
        slices_per_block=1,
        wire_dtype="fp32",
        param_dtype="fp32",
        micro_batch=2,
        prefetch=1,
    )
    quiet = StepCosts(gpu_machine(0.0), WORK, gpu_layout).forward_block_s("gpu0")
    hidden = StepCosts(gpu_machine(1e-3), WORK, gpu_layout).forward_block_s("gpu0")
    bound = StepCosts(gpu_machine(1e5), WORK, gpu_layout).forward_block_s("gpu0")
    assert hidden == quiet  # launches hidden behind the kernels
    assert bound == pytest.approx(calls * RUNTIME_OPS["opt"]["block"] * 0.1, rel=1e-9)  # issue-bound


def test_collective_calls_and_the_loop_lengthen_a_simulated_step(tmp_path: Path) -> None:
    """Two movers all-gather each block's slices: every round pays the collective call; two CPU
    compute ranks of one machine sum the loss scalars through shared memory, without a call (on
    two machines they pay it); every step pays the loop's host work."""
    tiny = Workload(TINY_SHAPES["tiny-opt"], 4, 64)
    lay = layout(pertp=2)
    base = StepCosts(cpu_machine(tmp_path), tiny, lay)
    called = StepCosts(cpu_machine(tmp_path, collective_us=500.0), tiny, lay)
    assert called.scalar_allreduce_s() == base.scalar_allreduce_s() == 0.0
    two_nodes = dataclasses.replace(lay, nodes=2)
    called_twice = StepCosts(cpu_machine(tmp_path, collective_us=500.0), tiny, two_nodes).scalar_allreduce_s()
    assert called_twice - StepCosts(cpu_machine(tmp_path), tiny, two_nodes).scalar_allreduce_s() == pytest.approx(
        500e-6
    )
    looped = StepCosts(cpu_machine(tmp_path, loop_us=700.0), tiny, lay)
    assert looped.loop_s() == pytest.approx(700e-6) and base.loop_s() == 0.0
    step = simulate(base).step_time_s
    rounds = tiny.model.layers * lay.rounds
    # each block's all-gather sits on the critical path of a compute rank that does nothing else
    assert simulate(called).step_time_s - step == pytest.approx(rounds * 500e-6, rel=0.05)
    assert simulate(looped).step_time_s - step == pytest.approx(700e-6, rel=0.05)
    assert math.isclose(StepCosts(cpu_machine(tmp_path), tiny, layout()).scalar_allreduce_s(), 0.0)


def test_the_expected_slowest_of_n_varying_steps() -> None:
    """E[max of n standard normals]: exact for 2 and 3 (1/sqrt(pi), 3/(2 sqrt(pi))), tabulated
    for 4 and 5 (1.0294, 1.1630)."""
    import math

    from zoplan.sim.costs import expected_max_normal

    assert expected_max_normal(1) == 0
    assert expected_max_normal(2) == pytest.approx(1 / math.sqrt(math.pi), rel=1e-9)
    assert expected_max_normal(3) == pytest.approx(1.5 / math.sqrt(math.pi), rel=1e-9)
    assert expected_max_normal(4) == pytest.approx(1.029375, abs=1e-6)
    assert expected_max_normal(5) == pytest.approx(1.162964, abs=1e-6)
    assert expected_max_normal(64) > expected_max_normal(16) > expected_max_normal(5)


def test_a_cpu_rank_alone_computes_on_every_core_of_its_socket(tmp_path: Path) -> None:
    """cpu-local's socket has 2 cores: one rank gets 2 threads, two ranks one each; the forward's
    arithmetic and memory traffic (not its op issue) run faster by threads_efficiency per extra
    thread; without a core count a rank has one thread."""
    machine = load_topology("cpu-local")
    alone = dataclasses.replace(layout(), upload="whole", movers=("rank0",), slices_per_block=1)
    two = layout(pertp=2)
    assert StepCosts(machine, WORK, alone).threads("rank0") == 2
    assert [StepCosts(machine, WORK, two).threads(g) for g in ("rank0", "rank1")] == [1, 1]
    gm = machine.gpu_model("rank0")
    assert forward_s(gm, 1e12, 0.0, "fp32", ops=10, threads=2) == pytest.approx(
        1e12 / (gm.tflops["fp32"] * 1e12) / (1 + gm.threads_efficiency) + 10 * gm.op_us * 1e-6, rel=1e-9
    )
    spec = yaml.safe_load(CPU_LOCAL.read_text())
    del spec["sockets"][0]["cores"]
    path = tmp_path / "no-cores.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert StepCosts(load_topology(path), WORK, alone).threads("rank0") == 1


def test_cpu_ranks_all_gather_at_their_collective_rate_not_on_the_memory_links(tmp_path: Path) -> None:
    """gloo over the loopback brings a rank far less than a memory copy: with collective_gbps an
    all-gather round costs a collective call plus the bytes a rank receives at that rate, and the
    simulator takes that instead of a ring on the links."""
    lay = layout(pertp=2)
    slow = StepCosts(cpu_machine(tmp_path, collective_us=500.0, collective_gbps=0.5), WORK, lay)
    n = len(lay.movers)
    assert slow.allgather_round_s() == pytest.approx(500e-6 + slow.round_param_bytes * (n - 1) / n / 0.5e9, rel=1e-12)
    on_links = StepCosts(cpu_machine(tmp_path, collective_us=500.0), WORK, lay)
    assert on_links.allgather_round_s() is None
    assert simulate(slow).step_time_s > simulate(on_links).step_time_s


def test_cpu_ranks_that_meet_before_every_block_compute_slower_and_wait(tmp_path: Path) -> None:
    """Without a profile, two CPU compute ranks of one machine issue each tensor op ``lockstep``
    times slower than one rank alone (their arithmetic as fast) and wait ``lockstep_wait_us`` at
    each meeting beyond the call; one compute rank (a relay beside it meets nobody to compute
    with) and a GPU pay neither."""
    plain = cpu_machine(tmp_path, collective_us=100.0, collective_gbps=0.5, op_us=5.0)
    locked = cpu_machine(
        tmp_path, collective_us=100.0, collective_gbps=0.5, op_us=5.0, lockstep=1.5, lockstep_wait_us=400.0
    )
    whole = dataclasses.replace(layout(pertp=2), upload="whole", movers=("rank0", "rank1"), slices_per_block=1)
    a, b = StepCosts(plain, WORK, whole), StepCosts(locked, WORK, whole)
    passes = a.micro_batches * whole.branches_per_gpu  # every micro-batch of each branch the rank runs
    for stage, kind in (("block_forward_s", "block"), ("embed_s", "embed"), ("head_s", "head")):
        extra = RUNTIME_OPS["opt"][kind] * passes * 5e-6 * 0.5
        assert getattr(b, stage)("rank0") - getattr(a, stage)("rank0") == pytest.approx(extra, rel=1e-9), stage
    assert b.whole_barrier_s() == pytest.approx(a.whole_barrier_s() + 400e-6)
    assert b.scalar_allreduce_s() == pytest.approx(a.scalar_allreduce_s() + 400e-6)
    assert simulate(b).step_time_s > simulate(a).step_time_s
    sliced = layout(pertp=2)
    round_a, round_b = StepCosts(plain, WORK, sliced).allgather_round_s(), StepCosts(locked, WORK, sliced)
    assert round_a is not None and round_b.allgather_round_s() == pytest.approx(round_a + 400e-6)
    alone = layout(pertp=1)  # one compute rank, the other a relay
    c, d = StepCosts(plain, WORK, alone), StepCosts(locked, WORK, alone)
    assert d.block_forward_s("rank0") == c.block_forward_s("rank0") and d.lockstep_wait_s() == 0.0
    gpu = load_topology("rtx4090-4x")
    assert all(gpu.gpu_model(g).lockstep == 1.0 and gpu.gpu_model(g).lockstep_wait_us == 0 for g in gpu.gpus)


def test_cpu_ranks_that_meet_through_collective_calls_pay_the_call(tmp_path: Path) -> None:
    """CPU ranks meet through shared memory where the CPU is x86 (only the wait costs); a topology
    whose ranks meet through collective calls (``meetings: collective``, any other CPU) pays the
    call at every whole-block meeting and at the loss sum too, and its step is longer. A profile's
    timed meeting replaces both alike."""
    figures = {"collective_us": 300.0, "collective_gbps": 0.5, "lockstep_wait_us": 40.0}
    shared = cpu_machine(tmp_path, **figures)
    called = cpu_machine(tmp_path, **figures, meetings="collective")
    assert shared.gpu_model("rank0").meetings == "shared-memory" and shared.spec_hash != called.spec_hash
    # a file that says what it did not have to keeps the hash of one that does not (plans made before)
    assert cpu_machine(tmp_path, **figures, meetings="shared-memory").spec_hash == shared.spec_hash
    whole = dataclasses.replace(layout(pertp=2), upload="whole", movers=("rank0", "rank1"), slices_per_block=1)
    a, b = StepCosts(shared, WORK, whole), StepCosts(called, WORK, whole)
    assert a.whole_barrier_s() == pytest.approx(40e-6) and b.whole_barrier_s() == pytest.approx(340e-6)
    assert a.scalar_allreduce_s() == pytest.approx(40e-6)
    # two hops of the ranks' memory links (5 us each way) and the call, then the wait
    assert b.scalar_allreduce_s() == pytest.approx(2 * 10e-6 + 300e-6 + 40e-6)
    longer = simulate(b).step_time_s - simulate(a).step_time_s
    assert longer == pytest.approx(OPT.layers * 300e-6 + 320e-6, rel=0.05)


def test_the_head_charges_the_loss_passes_over_the_logits(tmp_path: Path) -> None:
    """After its matrix product, each micro-batch's head computes the next-token loss: passes over
    its fp32 logits that the product does not overlap. Per logit: the log-softmax and NLL
    (LOSS_BYTES: 20 on a CPU rank, whose exponentials are slower than memory; 12 on a GPU) and an
    fp32 copy of logits made in a 2-byte dtype (6). The loss takes one sequence at a time: it
    costs the same a step whatever the micro-batch, so micro-batches of a block that costs the same
    stay one simulation for the search."""
    from zoplan.sim import costs as costs_module

    machine = cpu_machine(tmp_path)
    hbm = machine.gpu_model("rank0").hbm_gbps * 1e9
    for mb, per_logit in ((1, 20), (2, 20)):
        lay = layout(micro_batch=mb)
        c = StepCosts(machine, WORK, lay)
        assert c.loss_s("rank0") == pytest.approx(mb * WORK.seq_len * OPT.vocab * per_logit / hbm, rel=1e-12)
        free = StepCosts(machine, WORK, lay)
        mp = pytest.MonkeyPatch()
        mp.setattr(costs_module.StepCosts, "loss_s", lambda self, gpu: 0.0)
        try:
            without = free.head_s("rank0")
        finally:
            mp.undo()
        calls = c.micro_batches * lay.branches_per_gpu
        assert c.head_s("rank0") - without == pytest.approx(calls * c.loss_s("rank0"), rel=1e-9)
    dgx = load_topology("dgx-a100")
    gpu_layout = dataclasses.replace(
        layout(micro_batch=2), compute_gpus=("gpu0",), movers=("gpu0",), param_dtype="bf16", wire_dtype="bf16"
    )
    c = StepCosts(dgx, WORK, gpu_layout)
    hbm = dgx.gpu_model("gpu0").hbm_gbps * 1e9
    assert c.loss_s("gpu0") == pytest.approx(2 * WORK.seq_len * OPT.vocab * (12 + 6) / hbm, rel=1e-12)
    # the micro-batches split the same logits: the same loss a step, so the same simulation
    one = StepCosts(dgx, WORK, dataclasses.replace(gpu_layout, micro_batch=1))
    assert one.loss_s("gpu0") * one.micro_batches == pytest.approx(c.loss_s("gpu0") * c.micro_batches, rel=1e-12)


def test_the_once_a_step_stages_pay_their_cold_ops(tmp_path: Path) -> None:
    """The embedding and the head, run once a step after the blocks' passes, pay cold_op_us on
    top of op_us for each tensor op and kernel call the runtime issues there: the model's ops
    per micro-batch and branch, and the resident tensors' fused calls and copies back
    (runtime/engine.py _update_resident, _set_resident, _embedding_rows). A block pays none."""
    lay = layout()
    branches = lay.branches_per_gpu
    tensors = len(OPT.resident_tensors())
    small = tensors - 1  # opt-125m ties its head: the token table is the output projection
    for work, table_rows in ((WORK, True), (Workload(dataclasses.replace(OPT, vocab=1000), 4, 64), False)):
        base = StepCosts(cpu_machine(tmp_path, z_ns=1e-9, z_call_us=1.0), work, lay)
        cold = StepCosts(cpu_machine(tmp_path, z_ns=1e-9, z_call_us=1.0, cold_op_us=10.0), work, lay)
        mbs = base.micro_batches
        if table_rows:
            embed_calls = tensors + branches * (small + mbs)
            head_calls = branches + (branches - 1) * small + tensors
        else:
            embed_calls = (1 + branches) * tensors
            head_calls = (branches - 1) * tensors + tensors
        embed_calls += RUNTIME_OPS["opt"]["embed"] * mbs * branches
        head_calls += RUNTIME_OPS["opt"]["head"] * mbs * branches
        assert cold.embed_s("rank0") - base.embed_s("rank0") == pytest.approx(embed_calls * 10e-6, rel=1e-9)
        assert cold.head_s("rank0") - base.head_s("rank0") == pytest.approx(head_calls * 10e-6, rel=1e-9)
        assert cold.block_forward_s("rank0") == base.block_forward_s("rank0")


def test_per_device_costs_are_kept_by_device_model_and_cpu_rank(tmp_path: Path) -> None:
    """A StepCosts keeps each per-device figure for a kind of device (a GPU model; a CPU rank by
    itself): asked in any order, each GPU's figure is the one computed afresh for it, and two
    models' figures stay apart."""
    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "topologies"
    machine = load_topology(fixtures / "mixed-h100-l40s.yaml")
    work = Workload(load_model_shape("opt-13b"), 16, 512)
    figures = ("forward_block_s", "block_forward_s", "whole_update_s", "compute_block_s", "embed_s", "head_s")
    for upload in ("whole", "sliced"):
        mixed = Layout(
            perturbation=2,
            data=1,
            compute_gpus=("gpu4", "gpu0"),
            upload=upload,
            movers=("gpu4", "gpu0"),
            slices_per_block=1 if upload == "whole" else 2,
            shares=() if upload == "whole" else (3, 1),
            wire_dtype="bf16",
            param_dtype="bf16",
            micro_batch=4,
            prefetch=1,
        )
        kept = StepCosts(machine, work, mixed)
        for g in ("gpu0", "gpu4", "gpu0", "gpu4"):
            for name in figures:
                fresh = getattr(StepCosts, name).__wrapped__(StepCosts(machine, work, mixed), g)
                assert getattr(kept, name)(g) == fresh, (upload, name, g)
            assert kept.compute_block_s(g, resident=True) == StepCosts.compute_block_s.__wrapped__(
                StepCosts(machine, work, mixed), g, resident=True
            )
        assert kept.block_forward_s("gpu0") != kept.block_forward_s("gpu4")
        if upload == "sliced":
            parts = mixed.parts(kept.slice_params * 2)
            assert [kept.part_params(g) for g in ("gpu4", "gpu0", "gpu1")] == [hi - lo for lo, hi in parts] + [0]
    # CPU ranks: one alone on its socket has both cores, two on the other one each
    spec = yaml.safe_load(CPU_LOCAL.read_text())
    spec["sockets"] = [dict(spec["sockets"][0], id="cpu0"), dict(spec["sockets"][0], id="cpu1")]
    spec["gpus"] = [dict(spec["gpus"][0], id=f"rank{i}") for i in range(3)]
    link = spec["links"][0]
    spec["links"] = [dict(link, a=socket, b=f"rank{i}") for i, socket in enumerate(("cpu0", "cpu1", "cpu1"))]
    path = tmp_path / "two-sockets.yaml"
    path.write_text(yaml.safe_dump(spec))
    cpus = load_topology(path)
    ranks = ("rank0", "rank1", "rank2")
    three = dataclasses.replace(layout(), data=3, compute_gpus=ranks, upload="whole", movers=ranks, slices_per_block=1)
    kept = StepCosts(cpus, Workload(OPT, 6, 64), three)
    assert [kept.threads(g) for g in three.compute_gpus] == [2, 1, 1]
    assert kept.block_forward_s("rank0") < kept.block_forward_s("rank1") == kept.block_forward_s("rank2")


def test_a_memory_figure_in_a_message_is_never_rounded_to_nothing() -> None:
    """'host memory is short by 0.0 GiB' told nothing: small figures keep their digits."""
    from zoplan.sim.costs import GiB, gib

    assert gib(133.44 * GiB) == "133.4 GiB" and gib(2.94 * GiB) == "2.9 GiB" and gib(16 * GiB) == "16 GiB"
    assert gib(0.467 * GiB) == "0.47 GiB" and gib(4 * 2**20) == "4 MiB" and gib(100) == "1 MiB"

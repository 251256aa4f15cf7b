"""The simulator against closed forms, and its determinism."""

from __future__ import annotations

import dataclasses
import functools
import statistics
from pathlib import Path

import pytest
import yaml

from zoplan.sim.costs import StepCosts, Workload
from zoplan.sim.events import Loop, Process
from zoplan.sim.flownet import FlowNet
from zoplan.layout import Layout
from zoplan.models import ModelShape
from zoplan.program import Ref
from zoplan.sim import REPORTED_STEP, STEPS, simulate
from zoplan.topology import load_topology


# ----- shared links --------------------------------------------------------------------------------
def _run_flows(capacity: dict[str, float], flows: list[tuple[float, tuple[str, ...], float]]) -> list[float]:
    """Start every flow at t=0; return each one's completion time."""
    loop = Loop()
    net = FlowNet(loop, capacity)
    ends: list[float] = [0.0] * len(flows)

    def ended(i: int) -> None:
        ends[i] = loop.now

    for i, (nbytes, res, latency) in enumerate(flows):
        net.transfer(nbytes, res, latency, functools.partial(ended, i))
    loop.run()
    return ends


def test_one_transfer_takes_bytes_over_bandwidth_plus_latency() -> None:
    [end] = _run_flows({"pcie": 25e9}, [(1e9, ("pcie",), 2e-6)])
    assert end == pytest.approx(1e9 / 25e9 + 2e-6, rel=1e-12)


def test_two_transfers_sharing_a_link_each_take_twice_as_long() -> None:
    ends = _run_flows({"uplink": 25e9}, [(1e9, ("uplink",), 0.0), (1e9, ("uplink",), 0.0)])
    assert ends == pytest.approx([2 * 1e9 / 25e9] * 2, rel=1e-12)


def test_a_finished_flow_hands_its_bandwidth_to_the_others() -> None:
    # 1 GB and 3 GB on a 10 GB/s link: both at 5 GB/s until t=0.2 s, then the big one alone.
    ends = _run_flows({"l": 10e9}, [(1e9, ("l",), 0.0), (3e9, ("l",), 0.0)])
    assert ends == pytest.approx([0.2, 0.2 + 2e9 / 10e9], rel=1e-12)


def test_rates_are_max_min_fair_across_links() -> None:
    # Classic example: A crosses both links, B only the narrow one, C only the wide one.
    # narrow (10): A and B get 5 each; wide (30): A is frozen at 5, so C gets the other 25.
    ends = _run_flows(
        {"narrow": 10e9, "wide": 30e9},
        [(5e9, ("narrow", "wide"), 0.0), (5e9, ("narrow",), 0.0), (25e9, ("wide",), 0.0)],
    )
    assert ends[0] == pytest.approx(1.0) and ends[1] == pytest.approx(1.0) and ends[2] == pytest.approx(1.0)


class _Forgetful(dict):
    """A cache that keeps nothing: every set of routes is solved afresh."""

    def __setitem__(self, key: object, value: object) -> None:
        pass


def test_a_set_of_routes_seen_before_gets_the_rates_it_got_then() -> None:
    """The network keeps the allocation of each set of routes in flight and reuses it: a pipeline
    that starts the same transfers over and over (three GPUs' uploads through two shared uplinks,
    and their write-backs, in waves) finishes every one at the very time a network that solves
    every set afresh gives, and solves far fewer sets than it recomputes."""
    capacity = {"up0": 25e9, "up1": 25e9, "g0": 25e9, "g1": 25e9, "g2": 25e9, "back": 20e9, "mem": 60e9}
    routes = [("up0", "g0", "mem"), ("up0", "g1", "mem"), ("up1", "g2", "mem"), ("back", "mem")]

    def run(net_factory) -> tuple[list[float], int, int]:
        loop = Loop()
        net = net_factory(loop)
        ends: list[float] = []
        recomputes = [0]
        solve = net._recompute

        def counting() -> None:
            recomputes[0] += 1
            solve()

        net._recompute = counting  # type: ignore[method-assign]

        def stream(i: int, route: tuple[str, ...]) -> Process:
            wake = yield
            for wave in range(30):
                loop.after(0.001 * ((i + wave) % 3), wake)
                yield
                net.transfer(1e8 * (1 + i % 2), route, 1e-6, wake)
                yield
                ends.append(loop.now)

        for i, route in enumerate(routes):
            loop.start(stream(i, route))
        loop.run()
        return ends, recomputes[0], len(net._solved)

    kept, recomputed, solved = run(lambda loop: FlowNet(loop, capacity))
    fresh, _, _ = run(lambda loop: FlowNet(loop, capacity, _solved=_Forgetful()))
    assert kept == fresh and len(kept) == 30 * len(routes)
    assert solved < recomputed / 3


# ----- whole pipelines --------------------------------------------------------------------------
def _one_gpu_machine(tmp_path: Path, *, pcie_gbps: float, tflops: float, hbm_gbps: float = 1e6) -> Path:
    spec = {
        "version": 1,
        "name": "one-gpu",
        "gpu_models": {
            "g": {
                "memory_gib": 1000,
                "tflops": {"bf16": tflops, "fp32": tflops},
                "hbm_gbps": hbm_gbps,
                "matmul_efficiency": 1.0,
            }
        },
        "sockets": [{"id": "cpu0", "memory_gib": 4096, "memory_gbps": 1e6}],
        "gpus": [{"id": "gpu0", "model": "g"}],
        "links": [{"a": "cpu0", "b": "gpu0", "kind": "pcie", "gbps": pcie_gbps, "latency_us": 0}],
    }
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


SHAPE = ModelShape(
    name="toy",
    family="llama",
    layers=64,
    hidden=2048,
    ffn=5504,
    heads=16,
    kv_heads=16,
    vocab=1000,
    max_positions=2048,
    tied_head=False,
    embed_dim=2048,
)


def _pair() -> Layout:
    """2x1 on gpu0 and gpu2, both uploading slices of every block."""
    return Layout(
        perturbation=2,
        data=1,
        compute_gpus=("gpu0", "gpu2"),
        upload="sliced",
        movers=("gpu0", "gpu2"),
        slices_per_block=4,
        wire_dtype="bf16",
        param_dtype="bf16",
        micro_batch=2,
        prefetch=1,
    )


def _zo2(prefetch: int = 1) -> Layout:
    return Layout(
        perturbation=1,
        data=1,
        compute_gpus=("gpu0",),
        upload="whole",
        movers=("gpu0",),
        slices_per_block=1,
        wire_dtype="bf16",
        param_dtype="bf16",
        micro_batch=1,
        prefetch=prefetch,
    )


def test_transfer_bound_pipeline_takes_blocks_times_transfer_time(tmp_path: Path) -> None:
    machine = load_topology(_one_gpu_machine(tmp_path, pcie_gbps=10, tflops=1e6))
    costs = StepCosts(machine, Workload(SHAPE, 1, 16), _zo2())
    transfer_s = SHAPE.block_bytes("bf16") / 10e9
    assert costs.compute_block_s("gpu0") < transfer_s / 100  # really transfer bound
    result = simulate(costs)
    assert result.step_time_s == pytest.approx(SHAPE.layers * transfer_s, rel=0.01)
    assert result.bottleneck.startswith("PCIe")


def test_compute_bound_pipeline_takes_blocks_times_compute_time(tmp_path: Path) -> None:
    machine = load_topology(_one_gpu_machine(tmp_path, pcie_gbps=1e4, tflops=1))
    costs = StepCosts(machine, Workload(SHAPE, 1, 512), _zo2())
    compute_s = costs.compute_block_s("gpu0")
    assert SHAPE.block_bytes("bf16") / 1e13 < compute_s / 100  # really compute bound
    result = simulate(costs)
    assert result.step_time_s == pytest.approx(SHAPE.layers * compute_s, rel=0.01)
    assert result.bottleneck == "compute gpu0"


def test_the_what_if_factors_stretch_only_the_stage_that_bounds_the_step(tmp_path: Path) -> None:
    """zoplan plan's sensitivity: compute 25% slower lengthens a compute-bound step by 25% and a
    transfer-bound one by nothing; transfers 25% slower the other way round."""
    from zoplan.planner import sensitivity

    for pcie, tflops, bound in ((10, 1e6, "transfers"), (1e4, 1, "compute")):
        machine = load_topology(_one_gpu_machine(tmp_path, pcie_gbps=pcie, tflops=tflops))
        work = Workload(SHAPE, 1, 16 if bound == "transfers" else 512)
        step = simulate(StepCosts(machine, work, _zo2())).step_time_s
        slower = sensitivity(machine, work, _zo2(), 1.25)
        other = "compute" if bound == "transfers" else "transfers"
        assert slower[bound] == pytest.approx(1.25 * step, rel=0.01), bound
        assert slower[other] == pytest.approx(step, rel=0.01), bound
        assert StepCosts.compute_scale == StepCosts.transfer_scale == 1.0  # a plan's own costs


def test_simulation_is_deterministic() -> None:
    machine = load_topology("dgx-a100")
    layout = Layout(
        perturbation=2,
        data=2,
        compute_gpus=("gpu0", "gpu2", "gpu4", "gpu6"),
        upload="sliced",
        movers=tuple(machine.gpus),
        slices_per_block=16,
        wire_dtype="bf16",
        param_dtype="bf16",
        micro_batch=2,
        prefetch=2,
    )
    costs = StepCosts(machine, Workload(SHAPE, 8, 256), layout)
    a, b = simulate(costs, record=True), simulate(costs, record=True)
    assert a.step_time_s == b.step_time_s
    assert a.spans == b.spans and a.link_samples == b.link_samples
    assert len(a.step_ends) == STEPS and a.window == (a.step_ends[REPORTED_STEP - 1], a.step_ends[REPORTED_STEP])


def test_a_program_that_waits_for_an_op_it_does_not_run_is_named_as_a_bug() -> None:
    """The simulator reads each op's dependencies by index: a reference to an op the program does
    not run (a bug in zoplan.program) is an error that names it, not a KeyError or a hang."""
    costs = StepCosts(load_topology("dgx-a100"), Workload(SHAPE, 4, 256), _pair())
    simulate(costs)  # as built, it runs
    program = costs.program
    ops = list(program.ops)
    ops[-1] = ops[-1]._replace(deps=ops[-1].deps + (Ref("h2d b99 r0", ("gpu2",)),))
    costs.__dict__["program"] = dataclasses.replace(program, ops=tuple(ops))
    with pytest.raises(RuntimeError, match=r"waits for 'h2d b99 r0' on \('gpu2',\), which it does not run"):
        simulate(costs)


@pytest.mark.parametrize(
    "topology,upload,movers,prefetch",
    [
        ("dgx-a100", "sliced", 8, 2),
        ("dgx-a100", "whole", 4, 1),
        ("l40s-8x", "sliced", 2, 1),
        ("cpu-local", "sliced", 2, 1),  # CPU ranks: the streams of one rank take turns on its core
        ("cpu-local", "whole", 1, 2),
    ],
)
def test_a_simulation_that_stops_at_the_reported_step_reports_what_a_full_one_does(
    topology: str, upload: str, movers: int, prefetch: int
) -> None:
    """Unless a trace is recorded, the simulation stops when the reported step ends: its window,
    step time, utilization and bottleneck are those of the full three-step run, to the bit."""
    machine = load_topology(topology)
    gpus = tuple(machine.gpus)
    compute = gpus[:2] if upload == "sliced" and movers >= 2 else gpus[:movers]
    layout = Layout(
        perturbation=len(compute) if len(compute) <= 2 else 2,
        data=1 if len(compute) <= 2 else len(compute) // 2,
        compute_gpus=compute,
        upload=upload,
        movers=compute + tuple(g for g in gpus if g not in compute)[: movers - len(compute)],
        slices_per_block=movers if upload == "sliced" else 1,
        wire_dtype="fp32" if topology == "cpu-local" else "bf16",
        param_dtype="fp32" if topology == "cpu-local" else "bf16",
        micro_batch=2,
        prefetch=prefetch,
        resident=(1, 4),
    )
    costs = StepCosts(machine, Workload(SHAPE, 4, 128), layout)
    full, stopped = simulate(costs, record=True), simulate(costs)
    assert len(full.step_ends) == STEPS and len(stopped.step_ends) == REPORTED_STEP + 1
    assert stopped.window == full.window and stopped.step_time_s == full.step_time_s
    assert stopped.utilization == full.utilization and stopped.bottleneck == full.bottleneck
    assert stopped.step_ends == full.step_ends[: REPORTED_STEP + 1]


def test_a_simulation_leaves_nothing_for_the_cycle_collector() -> None:
    """What a simulation builds (events, processes, the compiled program) refer to one another;
    left as is, each simulation of a search leaves tens of thousands of objects that only Python's
    cycle collector frees, and it walks them for a third of a search's time. A simulation that
    ends, and one stopped early by its limit, must leave at most about a thousand."""
    import gc

    from zoplan.sim import Exceeded

    costs = StepCosts(load_topology("l40s-8x"), Workload(SHAPE, 4, 128), _pair())
    result = simulate(costs)
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        simulate(costs)
        assert gc.collect() < 1500
        with pytest.raises(Exceeded):
            simulate(costs, limit_s=result.step_time_s * 0.5)
        assert gc.collect() < 1500
    finally:
        if collecting:
            gc.enable()


def test_shared_uplink_slows_packed_gpus_in_the_simulation() -> None:
    """Two GPUs behind one DGX A100 switch share its uplink; two on different switches do not."""
    machine = load_topology("dgx-a100")
    shape = ModelShape(
        name="t",
        family="opt",
        layers=8,
        hidden=4096,
        ffn=16384,
        heads=32,
        kv_heads=32,
        vocab=1000,
        max_positions=2048,
        tied_head=True,
        embed_dim=4096,
    )

    def step(gpus: tuple[str, str]) -> float:
        layout = Layout(
            perturbation=2,
            data=1,
            compute_gpus=gpus,
            upload="whole",
            movers=gpus,
            slices_per_block=1,
            wire_dtype="bf16",
            param_dtype="bf16",
            micro_batch=1,
            prefetch=1,
        )
        return simulate(StepCosts(machine, Workload(shape, 1, 16), layout)).step_time_s

    assert step(("gpu0", "gpu1")) == pytest.approx(2 * step(("gpu0", "gpu2")), rel=0.05)


def test_relays_carry_blocks_so_a_small_batch_uses_every_uplink() -> None:
    """Global batch 1 keeps only a perturbation pair computing; relays add their PCIe links."""
    machine = load_topology("dgx-a100")
    shape = ModelShape(
        name="t",
        family="opt",
        layers=16,
        hidden=4096,
        ffn=16384,
        heads=32,
        kv_heads=32,
        vocab=1000,
        max_positions=2048,
        tied_head=True,
        embed_dim=4096,
    )
    pair = ("gpu0", "gpu2")

    def step(movers: tuple[str, ...]) -> float:
        layout = Layout(
            perturbation=2,
            data=1,
            compute_gpus=pair,
            upload="sliced",
            movers=movers,
            slices_per_block=len(movers),
            wire_dtype="bf16",
            param_dtype="bf16",
            micro_batch=1,
            prefetch=2,
        )
        return simulate(StepCosts(machine, Workload(shape, 1, 64), layout)).step_time_s

    everyone = pair + tuple(g for g in machine.gpus if g not in pair)
    # 2 uplinks vs 4 uplinks: close to half the time when transfer bound
    assert step(everyone) < 0.6 * step(pair)


def test_a_steps_first_uploads_start_in_the_step_before_unless_several_ranks_share_whole_blocks() -> None:
    """As the runtime does: one compute rank (or sliced uploads) carries the next step's first
    uploads into the step before; whole blocks read by several compute ranks of a machine wait
    for their own step, whose ranks all read a block before any writes its share back."""
    machine = load_topology("dgx-a100")
    shape = ModelShape(
        name="t",
        family="opt",
        layers=8,
        hidden=4096,
        ffn=16384,
        heads=32,
        kv_heads=32,
        vocab=1000,
        max_positions=2048,
        tied_head=True,
        embed_dim=4096,
    )

    def first_upload_start(gpus: tuple[str, ...], upload: str) -> tuple[float, float]:
        layout = Layout(
            perturbation=1,
            data=len(gpus),
            compute_gpus=gpus,
            upload=upload,
            movers=gpus,
            slices_per_block=len(gpus) if upload == "sliced" else 1,
            wire_dtype="bf16",
            param_dtype="bf16",
            micro_batch=1,
            prefetch=2,
        )
        result = simulate(StepCosts(machine, Workload(shape, 2 * len(gpus), 64), layout), record=True)
        starts = [
            t0
            for g, _, cat, label, step, _, t0, _ in result.spans
            if g == gpus[0] and cat == "h2d" and label.startswith("h2d b0") and step == REPORTED_STEP
        ]
        return min(starts), result.window[0]

    start, step_start = first_upload_start(("gpu0",), "whole")
    assert start < step_start
    start, step_start = first_upload_start(("gpu0", "gpu2"), "sliced")
    assert start < step_start
    start, step_start = first_upload_start(("gpu0", "gpu2"), "whole")
    assert start >= step_start


def test_gpu_memory_counts_what_the_runtime_allocates(tmp_path: Path) -> None:
    """One compute GPU, dual forward, whole-block uploads, prefetch 2, no resident block: the
    reserve, prefetch + 1 uploaded blocks, one work buffer per branch (theta + s*eps*z), the
    resident parts twice (parameters and their master copy) and one block's activations."""
    from zoplan.sim.costs import GPU_RESERVE_BYTES

    machine = load_topology(_one_gpu_machine(tmp_path, pcie_gbps=10, tflops=1e6))
    costs = StepCosts(machine, Workload(SHAPE, 1, 16), _zo2(prefetch=2))
    block = SHAPE.block_params() * 2  # bf16
    parts = SHAPE.resident_params() * 2
    activations = SHAPE.block_activation_bytes(1, 16, "bf16", 2) + SHAPE.head_activation_bytes(1, 16, "bf16")
    assert costs.gpu_memory_bytes("gpu0") == GPU_RESERVE_BYTES + 3 * block + 2 * block + 2 * parts + activations


def test_the_bound_names_a_close_runner_up_of_another_kind() -> None:
    """One bottleneck story: the busiest resource, and the busiest of another kind when it is
    nearly as busy (the step leans on both: the sensitivity line shows both moving it)."""
    from zoplan.sim import SimResult

    util = {"compute gpu0": 0.99, "compute gpu1": 0.99, "PCIe cpu0->gpu0": 0.94, "NVLink gpu0->gpu1": 0.5}
    result = SimResult(step_time_s=1.0, window=(0.0, 1.0), step_ends=[], utilization=util, bottleneck="compute gpu0")
    assert result.runner_up() == "PCIe cpu0->gpu0"  # not compute gpu1: the same kind says nothing new
    assert result.bound_story() == "compute gpu0 (99% busy), then PCIe cpu0->gpu0 (94%)"
    util["PCIe cpu0->gpu0"] = 0.6
    assert result.runner_up() is None and result.bound_story() == "compute gpu0 (99% busy)"
    # beside compute, an exchange stream as busy (updates and all-gathers by turns) is named;
    # beside a link it is that link's traffic again
    result.streams = {"exchange gpu1": 0.97, "exchange gpu0": 0.97}
    assert result.bound_story() == "compute gpu0 (99% busy), then exchange gpu0 (97%)"
    on_link = SimResult(1.0, (0.0, 1.0), [], {"NVLink gpu0->gpu1": 0.99}, "NVLink gpu0->gpu1", streams=result.streams)
    assert on_link.runner_up() is None


def test_an_exchange_stream_as_busy_as_compute_is_the_runner_up_of_a_real_plan(tmp_path) -> None:
    """llama-2-70b on two NVLinked A100s, every block resident and sharded: no PCIe traffic, the
    NVLink all-gathers under 90% busy, but the exchange stream updating and gathering by turns is
    nearly as busy as compute, and transfers 25% slower lengthen the step by more than 10%."""
    from zoplan.layout import Pins
    from zoplan.planner import plan as make_plan, sensitivity

    report = make_plan("llama-2-70b", "dgx-a100", global_batch=1, pins=Pins(gpus=("gpu0", "gpu1"), perturbation=2))
    best = report.search.best
    assert best.sim is not None and best.layout.upload == "sliced"
    assert max(u for k, u in best.sim.utilization.items() if k.startswith("NVLink")) < 0.9 * 0.99
    assert best.sim.runner_up() == "exchange gpu0", best.sim.bound_story()
    slower = sensitivity(report.machine, report.search.workload, best.layout)
    assert slower["transfers"] > 1.1 * best.step_time_s, slower


@pytest.mark.parametrize(
    "topology,model,batch,seq,dtype",
    [
        ("rtx4090-4x", "opt-6.7b", 8, 256, "bf16"),
        ("l40s-8x", "llama-2-13b", 8, 256, "bf16"),
        ("cpu-local", "opt-125m", 4, 64, "fp32"),
        ("cpu-local", "opt-350m", 16, 512, "fp32"),
    ],
)
def test_a_limited_simulation_stops_exactly_when_the_step_reaches_its_limit(
    monkeypatch: pytest.MonkeyPatch, topology: str, model: str, batch: int, seq: str, dtype: str
) -> None:
    """A limited simulation raises Exceeded if and only if the step it would report reaches the
    limit, for limits a millionth below and above the step, on every kind of layout the search
    tries (resident blocks included: their whole-block update has no barrier); on GPU machines,
    most stop once the reported step repeats the one before (sim._Mirror), early in it."""
    import zoplan.sim as sim_module
    from zoplan.models import load_model_shape
    from zoplan.search import enumerate_layouts, fit
    from zoplan.layout import Pins
    from zoplan.sim import Exceeded

    machine = load_topology(topology)
    work = Workload(load_model_shape(model), batch, seq)
    layouts = [
        layout
        for base in enumerate_layouts(machine, work, Pins(), dtype)
        for layout in fit(machine, work, base, None)[0]
    ]
    stops: list[float] = []  # when the mirror stopped one
    into: list[float] = []  # how far into the reported step
    real = sim_module._Mirror.repeats

    def watched(self: sim_module._Mirror, now: float) -> float | None:
        shift = real(self, now)
        if shift is not None:
            stops.append(now)
        return shift

    monkeypatch.setattr(sim_module._Mirror, "repeats", watched)
    kinds = set()
    for layout in layouts[:: max(1, len(layouts) // 40)]:
        costs = StepCosts(machine, work, layout)
        truth = simulate(costs)
        kinds.add(
            (layout.upload, len(layout.movers) > len(layout.compute_gpus), bool(layout.resident), layout.prefetch)
        )
        ahead = simulate(costs, limit_s=truth.step_time_s * (1 + 1e-6))
        assert (ahead.step_time_s, ahead.utilization) == (truth.step_time_s, truth.utilization)
        before = len(stops)
        with pytest.raises(Exceeded):
            simulate(costs, limit_s=truth.step_time_s * (1 - 1e-6))
        if len(stops) > before:  # stopped by the mirror: how far into the step
            start, end = truth.window
            into.append((stops[-1] - start) / (end - start))
    assert len(kinds) >= 3
    if topology == "cpu-local":  # its ranks' streams queue for one core: no mirror there
        assert not stops
    else:  # most stopped before the middle of the step (small models: a few blocks are a large part)
        assert into and statistics.median(into) < 0.5, into

"""Which model a calibration profile serves: the shape, not the name (zoplan/profile.py check_profile)."""

from __future__ import annotations

import json
import math
from importlib import resources
import re
from pathlib import Path

import pytest
import yaml

from zoplan.errors import ZoplanError
from zoplan.models import load_model_shape
from zoplan.planner import plan
from zoplan.search import Pins
from zoplan.profile import PROFILE_VERSIONS
from zoplan.topology import load_topology

FIXTURE = Path(__file__).parent / "fixtures" / "configs" / "opt-125m" / "config.json"


def write_profile(path: Path, *, legacy: bool = False, topology: str = "cpu-local", node: bool = False) -> Path:
    """A profile of ``topology`` measured on a checkpoint directory named 'my-base' of opt-125m's shape."""
    machine = load_topology(topology)
    base = path.parent / "my-base"
    base.mkdir(exist_ok=True)
    (base / "config.json").write_text(FIXTURE.read_text())
    shape = load_model_shape(str(base))
    model = {"name": shape.name, "hash": shape.hash, "micro_batch": 2, "seq_len": 64, "dtype": "fp32"}
    if not legacy:
        model["shape_hash"] = shape.shape_hash
    times = {"1x1": 0.17, "1x2": 0.19, "2x1": 0.22, "2x2": 0.25}
    tree = {
        "version": PROFILE_VERSIONS[-1],
        "machine": {"name": machine.name, "hash": machine.hash, **({"node_hash": machine.node_hash} if node else {})},
        "model": model,
        "measured_on": {"host": "test", "device": "cpu"},
        "devices": {
            g: {"h2d_gbps": 27.0, "d2h_gbps": 26.0, "h2d_gbps_together": 14.0, "d2h_gbps_together": 13.0}
            for g in machine.gpus
        },
        "allgather": {"ranks": 2, "latency_us": 300.0, "gbps": 0.9, "wait_us": 500.0},
        "scalar_latency_us": 600.0,
        "compute": {"block_s": times, "embed_s": dict(times), "head_s": dict(times), "update_s_per_param": 2e-8},
    }
    path.write_text(yaml.safe_dump(tree))
    return path


def test_a_profile_of_a_checkpoint_serves_the_preset_of_its_shape(tmp_path: Path) -> None:
    profile = write_profile(tmp_path / "profile.yaml")
    report = plan("opt-125m", "cpu-local", global_batch=4, seq_len=64, dtype="fp32", profile=profile)
    assert report.plan.profile is not None
    assert load_model_shape("opt-125m").shape_hash == load_model_shape(str(tmp_path / "my-base")).shape_hash
    other = tmp_path / "deeper"
    other.mkdir()
    config = json.loads(FIXTURE.read_text())
    config["num_hidden_layers"] = 13
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ZoplanError, match="holds compute times for model 'my-base'.*not for 'deeper'") as said:
        plan(str(other), "cpu-local", global_batch=4, seq_len=64, dtype="fp32", profile=profile)
    # the fix measures into a file of its own, not over the other model's profile
    assert f"-o {tmp_path / 'deeper-profile.yaml'}" in said.value.fix and f"-o {profile} " not in said.value.fix
    # a plan whose profile is gone says so, and that a new one would not be it
    from zoplan.planfile import write_plan
    from zoplan.planner import timeline

    write_plan(report.plan, tmp_path / "plan.yaml")
    profile.unlink()
    with pytest.raises(ZoplanError, match=f"planned with the profile {profile}, which is not there any more") as said:
        timeline(tmp_path / "plan.yaml")
    assert "plan again" in said.value.fix


def test_one_nodes_profile_serves_a_cluster_of_such_nodes(tmp_path: Path) -> None:
    """Calibrate measures one node and refuses a topology of several: the profile of one node's
    file serves the cluster's file (its name, node count, network and price aside), and no other
    machine; the same name described otherwise is said to be so."""
    one = tmp_path / "node.yaml"
    one.write_text((resources.files("zoplan.topologies") / "cpu-local.yaml").read_text())
    profile = write_profile(tmp_path / "profile.yaml", topology=str(one), node=True)
    cluster = tmp_path / "cluster.yaml"
    text = one.read_text().replace("name: cpu-local", "name: my-cluster")
    cluster.write_text(
        re.sub(r"(?m)^description: .*$", 'description: "four of these over 25 Gb/s"', text)
        + "nodes: 4\nnetwork: {gbps: 25, latency_us: 5}\nprice_per_hour_usd: 8.0\n"
    )
    assert "four of these" in load_topology(str(cluster)).spec.description  # (free text: no part of the node)
    assert load_topology(str(cluster)).hash != load_topology(str(one)).hash
    report = plan("opt-125m", str(cluster), global_batch=8, seq_len=64, dtype="fp32", profile=profile)
    assert report.plan.profile is not None and report.plan.profile.hash == load_profile_hash(profile)
    # a node of other devices is another machine, and a profile from before node_hash matches its own file only
    for changed, node in ((text.replace("cores: 2}", "cores: 1}"), True), (text, False)):
        other = tmp_path / "other.yaml"
        other.write_text(changed + "nodes: 4\nnetwork: {gbps: 25, latency_us: 5}\n")
        with pytest.raises(ZoplanError, match="was measured on 'cpu-local'") as said:
            plan(
                "opt-125m",
                str(other),
                global_batch=8,
                seq_len=64,
                dtype="fp32",
                profile=write_profile(tmp_path / "p.yaml", topology=str(one), node=node),
            )
        # the fix: one node's file
        assert "calibrate one of its nodes" in said.value.fix
        assert ("older zoplan" in said.value.message) is (not node)
    edited = tmp_path / "edited.yaml"
    edited.write_text(one.read_text().replace("cores: 2}", "cores: 1}"))
    with pytest.raises(ZoplanError, match="a machine of that name, described otherwise since"):
        plan("opt-125m", str(edited), global_batch=8, seq_len=64, dtype="fp32", profile=profile)


def load_profile_hash(path: Path) -> str:
    from zoplan.profile import load_profile

    return load_profile(path).hash


def test_a_profile_without_a_shape_hash_matches_by_name_and_shape(tmp_path: Path) -> None:
    profile = write_profile(tmp_path / "profile.yaml", legacy=True)
    plan(str(tmp_path / "my-base"), "cpu-local", global_batch=4, seq_len=64, dtype="fp32", profile=profile)
    with pytest.raises(ZoplanError, match="holds compute times for model 'my-base'"):
        plan("opt-125m", "cpu-local", global_batch=4, seq_len=64, dtype="fp32", profile=profile)


def test_the_movers_all_gather_takes_the_figure_measured_for_their_group_size(tmp_path: Path) -> None:
    """A 4-GPU machine calibrated among 4 ranks and among the first 2 and 3: 2 movers take the
    2-rank figure; without it they fall back to the simulated links."""
    from zoplan.sim.costs import StepCosts, Workload
    from zoplan.layout import Layout
    from zoplan.profile import apply_profile, load_profile

    def validate_profile_dict(data: dict):
        path = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text(yaml.safe_dump(data))
        return load_profile(path)

    machine = load_topology("rtx4090-4x")
    shape = load_model_shape("opt-125m")
    times = {"1x1": 0.017, "1x2": 0.019, "2x1": 0.022, "2x2": 0.025}
    tree = {
        "version": PROFILE_VERSIONS[-1],
        "machine": {"name": machine.name, "hash": machine.hash},
        "model": {
            "name": shape.name,
            "hash": shape.hash,
            "shape_hash": shape.shape_hash,
            "micro_batch": 1,
            "seq_len": 64,
            "dtype": "bf16",
        },
        "devices": {
            g: {"h2d_gbps": 20.0, "d2h_gbps": 20.0, "h2d_gbps_together": 10.0, "d2h_gbps_together": 10.0}
            for g in machine.gpus
        },
        "allgather": {"ranks": 4, "latency_us": 90.0, "gbps": 5.0, "wait_us": 40.0},
        "allgather_groups": [
            {"ranks": 2, "latency_us": 30.0, "gbps": 11.0, "wait_us": 40.0},
            {"ranks": 3, "latency_us": 60.0, "gbps": 7.0, "wait_us": 40.0},
        ],
        "scalar_latency_us": 50.0,
        "compute": {"block_s": times, "embed_s": dict(times), "head_s": dict(times), "update_s_per_param": 1e-11},
    }
    profile = validate_profile_dict(tree)
    measured = apply_profile(machine, profile, tmp_path / "p.yaml")
    work = Workload(shape, 4, 64)

    def round_s(movers: int, on=measured) -> float | None:
        layout = Layout(
            perturbation=1,
            data=1,
            compute_gpus=("gpu0",),
            upload="sliced",
            movers=tuple(machine.gpus[:movers]),
            slices_per_block=movers,
            wire_dtype="bf16",
            param_dtype="bf16",
            micro_batch=1,
            prefetch=1,
        )
        return StepCosts(on, work, layout).allgather_round_s()

    for movers, (lat, bw) in {2: (30.0, 11.0), 3: (60.0, 7.0), 4: (90.0, 5.0)}.items():
        nbytes = math.ceil(shape.block_params() / movers) * 2 * movers * (movers - 1) / movers
        assert round_s(movers) == pytest.approx((lat + 40.0) * 1e-6 + nbytes / (bw * 1e9))
    without = validate_profile_dict({**tree, "allgather_groups": []})
    assert round_s(2, apply_profile(machine, without, tmp_path / "q.yaml")) is None
    # a profile written before the groups were measured still loads
    assert validate_profile_dict({k: v for k, v in tree.items() if k != "allgather_groups"}).allgather_groups == []


def test_the_training_loop_between_steps_lengthens_the_step_by_its_measured_time(tmp_path: Path) -> None:
    """A profile's loop_s (next batch, journal line) follows the loss all-reduce on every compute
    rank: on one-thread CPU ranks the step grows by exactly that time. Without it: no loop span."""
    from zoplan.planfile import write_plan
    from zoplan.planner import timeline

    base = yaml.safe_load(write_profile(tmp_path / "base.yaml").read_text())
    with_loop = tmp_path / "loop.yaml"
    loop = {"1x1": 0.004, "1x2": 0.005, "2x1": 0.004, "2x2": 0.005}
    with_loop.write_text(yaml.safe_dump({**base, "compute": {**base["compute"], "loop_s": loop}}))
    steps, spans, bounds = {}, {}, {}
    for name, profile in (("base", tmp_path / "base.yaml"), ("loop", with_loop)):
        report = plan(
            str(tmp_path / "my-base"),
            "cpu-local",
            global_batch=4,
            seq_len=64,
            dtype="fp32",
            profile=profile,
            pins=Pins(
                perturbation=2,
                data=1,
                micro_batch=2,
                resident=0,
                wire_dtype="fp32",
                upload="sliced",
                slices=2,
                prefetch=1,
            ),
        )
        write_plan(report.plan, tmp_path / f"{name}-plan.yaml")
        result = timeline(tmp_path / f"{name}-plan.yaml").candidate.sim
        steps[name] = report.plan.prediction.step_time_s
        spans[name] = [s for s in result.spans if s[2] == "loop" and s[4] == 1]
        bounds[name] = report.search.ranked[0].bound
        # the bound that prunes the search stays below every simulated step
        assert all(c.bound.prune_bound_s <= c.step_time_s * (1 + 1e-9) for c in report.search.ranked)
    # 2 micro-batches of the calibrated size, 1 branch per rank: 1x1 + (1x2 - 1x1) = 5 ms
    assert steps["loop"] - steps["base"] == pytest.approx(0.005, rel=1e-6)
    assert spans["base"] == []
    assert sorted(s[0] for s in spans["loop"]) == ["rank0", "rank1"]
    assert all(s[7] - s[6] == pytest.approx(0.005) for s in spans["loop"])
    # the loop is serial on every compute rank: the machine bound counts it too
    assert bounds["loop"].machine_bound_s - bounds["base"].machine_bound_s == pytest.approx(0.005, rel=1e-6)


def test_the_compute_dtype_defaults_to_the_profiles_and_another_is_refused(tmp_path: Path) -> None:
    from zoplan.planner import compute_dtype

    tree = yaml.safe_load(write_profile(tmp_path / "fp32.yaml").read_text())
    tree["model"]["dtype"] = "bf16"
    (tmp_path / "bf16.yaml").write_text(yaml.safe_dump(tree))
    model = str(tmp_path / "my-base")
    # CPU ranks plan fp32 by default, but a profile measured in bf16 decides
    assert compute_dtype(load_topology("cpu-local"), None) == "fp32"
    assert compute_dtype(load_topology("h100-pcie-1x"), None) == "bf16"
    report = plan(model, "cpu-local", global_batch=4, seq_len=64, profile=tmp_path / "bf16.yaml")
    assert report.plan.transfer.param_dtype == "bf16"
    with pytest.raises(ZoplanError, match="compute times measured in bf16, not fp32") as info:
        plan(model, "cpu-local", global_batch=4, seq_len=64, dtype="fp32", profile=tmp_path / "bf16.yaml")
    assert "--dtype bf16" in info.value.fix


def test_the_plan_says_when_it_scales_the_profiles_compute_times_to_another_micro_batch(tmp_path: Path) -> None:
    from zoplan.cli.render import plan_footer

    profile = write_profile(tmp_path / "profile.yaml")  # timed 2 x 64 tokens
    model = str(tmp_path / "my-base")
    same = plan(model, "cpu-local", global_batch=4, seq_len=64, profile=profile, pins=Pins(micro_batch=2))
    other = plan(model, "cpu-local", global_batch=4, seq_len=32, profile=profile, pins=Pins(micro_batch=1))
    assert "note:" not in plan_footer(same).plain
    note = plan_footer(other).plain
    assert "timed micro-batches of 2 × 64 tokens; this plan's are 1 × 32" in note
    assert "--micro-batch 1 --seq-len 32" in note


def test_the_calibration_table_shows_every_group_and_an_unresolved_rate_in_words(tmp_path: Path) -> None:
    from rich.console import Console

    from zoplan.profile import load_profile
    from zoplan.cli.render import profile_table

    tree = yaml.safe_load(write_profile(tmp_path / "base.yaml").read_text())
    tree["allgather"] = {"ranks": 3, "latency_us": 280.0, "gbps": 1e6, "wait_us": 500.0}
    tree["allgather_groups"] = [{"ranks": 2, "latency_us": 250.0, "gbps": 1.5, "wait_us": 500.0}]
    tree["compute"]["block_s"]["1x8"] = 0.61
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(tree))
    console = Console(width=200, record=True)
    console.print(profile_table(load_profile(tmp_path / "p.yaml")))
    text = console.export_text()
    assert "all-gather among 2" in text and "250 µs + 1.50 GB/s" in text
    assert "all-gather among 3" in text and "280 µs + bytes too cheap to time" in text
    assert "1000000" not in text
    blocks = [line for line in text.splitlines() if "block compute" in line]
    assert [
        line.split("block compute, ")[1].split(" │")[0].strip() for line in blocks
    ] == [  # every timed setting, in order
        "1 branch(es), 1 micro-batch(es)",
        "1 branch(es), 2 micro-batch(es)",
        "1 branch(es), 8 micro-batch(es)",
        "2 branch(es), 1 micro-batch(es)",
        "2 branch(es), 2 micro-batch(es)",
    ]
    assert "610.0 ms" in blocks[2]


def _profile_with(tmp_path: Path, name: str, **block_s: float):
    from zoplan.profile import load_profile

    tree = yaml.safe_load(write_profile(tmp_path / f"{name}-base.yaml").read_text())
    tree["compute"]["block_s"] = {k.replace("_", "x").lstrip("b"): v for k, v in block_s.items()}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(tree))
    return load_profile(tmp_path / f"{name}.yaml")


def test_block_times_are_piecewise_linear_through_every_timed_micro_batch_count(tmp_path: Path) -> None:
    p = _profile_with(tmp_path, "three", b1_1=1.0, b1_2=1.5, b1_4=2.0, b2_1=2.0, b2_2=3.0)
    assert [p.block_s(1, m) for m in (1, 2, 3, 4)] == pytest.approx([1.0, 1.5, 1.75, 2.0])
    assert p.block_s(1, 8) == pytest.approx(3.0)  # past the last count: the last piece's slope
    assert p.block_s(2, 5) == pytest.approx(1.0 + 5 * 1.0)  # two counts: fixed 1.0 + m x 1.0 per micro-batch
    # the part above the fixed 0.5 s (1x1 less one micro-batch's worth) scales with the tokens
    assert p.block_s(1, 3, tokens_scale=2.0) == pytest.approx(0.5 + 1.25 * 2.0)
    # a noisy count that took less than the one before does not make more micro-batches faster
    noisy = _profile_with(tmp_path, "noisy", b1_1=1.0, b1_2=1.5, b1_4=1.2, b2_1=2.0, b2_2=3.0)
    assert [noisy.block_s(1, m) for m in (2, 4, 8)] == pytest.approx([1.5, 1.5, 1.5])


def test_a_setting_key_that_is_not_branches_x_micro_batches_is_refused(tmp_path: Path) -> None:
    from zoplan.profile import load_profile

    tree = yaml.safe_load(write_profile(tmp_path / "base.yaml").read_text())
    tree["compute"]["head_s"]["1xfour"] = 0.3
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(ZoplanError, match="compute.head_s has the key '1xfour'"):
        load_profile(tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    "stage,value", [("block_s", 0.0), ("embed_s", 0.0), ("head_s", 1e300), ("block_s", 3601.0), ("block_s", 1e-300)]
)
def test_a_stage_time_no_forward_takes_is_refused(tmp_path: Path, stage: str, value: float) -> None:
    """0 s for a block (a hand edit) planned a step half as long as the machine's; 1e300 s a table
    of 130-digit figures; 1e-300 s (above 0) a step of 6.5e294 s, through a CPU layout's lockstep
    factor (lockstep_s over the 1x2 time)."""
    from zoplan.profile import load_profile

    tree = yaml.safe_load(write_profile(tmp_path / "base.yaml").read_text())
    tree["compute"][stage]["1x1"] = value
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(ZoplanError, match=f"compute.{stage}.1x1"):
        load_profile(tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    "where,value",
    [
        ("allgather.wait_us", 1e308),
        ("allgather.latency_us", 4e9),
        ("allgather.gbps", 1e-300),
        ("scalar_latency_us", 1e300),
        ("devices.rank0.h2d_gbps", 1e-9),
        ("devices.rank0.d2h_gbps_together", 1e300),
        ("compute.update_s_per_param", 1e-3),
        ("compute.loop_s.1x1", 1e300),
        ("compute.lockstep_s.block", 1e300),
        ("meeting.wait_us", 1e308),
    ],
)
def test_a_figure_no_measurement_gives_is_refused(tmp_path: Path, where: str, value: float) -> None:
    """A wait of 1e308 us, edited by hand into a calibrated profile, planned exit 0 a step of 300
    digits, "0% busy" and "0.00x": every measured figure is bounded, as the stage times are."""
    from zoplan.profile import load_profile

    tree = yaml.safe_load(write_profile(tmp_path / "base.yaml").read_text())
    tree["meeting"] = {"wait_us": 50.0, "scalar_us": 20.0}
    tree["compute"]["loop_s"] = {"1x1": 0.001}
    tree["compute"]["lockstep_s"] = {"block": 0.2}
    assert load_profile(write_yaml(tmp_path / "good.yaml", tree)) is not None  # as it was
    *path, last = where.split(".")
    node = tree
    for key in path:
        node = node[key]
    node[last] = value
    with pytest.raises(ZoplanError, match=re.escape(where)):
        load_profile(write_yaml(tmp_path / "bad.yaml", tree))


def write_yaml(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def test_a_profile_without_one_of_the_machines_devices_is_refused(tmp_path: Path) -> None:
    """Calibrate measures every device: one deleted (or renamed) planned on the topology's figures
    for it, without a word."""
    tree = yaml.safe_load(write_profile(tmp_path / "base.yaml").read_text())
    (gone, _), *_ = tree["devices"].items()
    del tree["devices"][gone]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(ZoplanError, match=f"has no figures for {gone}, a device of 'cpu-local'"):
        plan(str(tmp_path / "my-base"), "cpu-local", global_batch=4, seq_len=64, profile=tmp_path / "bad.yaml")


def test_the_plan_says_when_it_extrapolates_past_the_timed_micro_batch_counts(tmp_path: Path) -> None:
    from zoplan.cli.render import plan_footer

    model = str(tmp_path / "my-base")
    pins = Pins(perturbation=2, data=1, micro_batch=2)
    two = plan(model, "cpu-local", global_batch=8, seq_len=64, profile=write_profile(tmp_path / "p.yaml"), pins=pins)
    assert "each rank runs 4 micro-batches a step, more than the profile timed (1, 2)" in plan_footer(two).plain
    assert "--micro-batches 1,2,4" in plan_footer(two).plain
    _profile_with(tmp_path, "four", b1_1=0.17, b1_2=0.19, b1_4=0.23, b2_1=0.22, b2_2=0.25, b2_4=0.31)
    four = plan(model, "cpu-local", global_batch=8, seq_len=64, profile=tmp_path / "four.yaml", pins=pins)
    assert "micro-batches a step" not in plan_footer(four).plain


def test_the_sequence_length_defaults_to_the_profiles_else_512_within_the_models_positions(tmp_path: Path) -> None:
    profile = write_profile(tmp_path / "profile.yaml")  # timed 2 x 64 tokens
    model = str(tmp_path / "my-base")
    assert plan(model, "cpu-local", global_batch=4, profile=profile).plan.batch.seq_len == 64
    assert plan(model, "cpu-local", global_batch=4).plan.batch.seq_len == 512
    short = tmp_path / "short"
    short.mkdir()
    config = json.loads(FIXTURE.read_text())
    config["max_position_embeddings"] = 128
    (short / "config.json").write_text(json.dumps(config))
    assert plan(str(short), "cpu-local", global_batch=4).plan.batch.seq_len == 128
    with pytest.raises(ZoplanError, match="--seq-len 200 is longer than the 128 positions") as info:
        plan(str(short), "cpu-local", global_batch=4, seq_len=200)
    assert info.value.fix == "use --seq-len 128 or less"


def test_a_measured_duplex_rate_caps_the_sockets_bus_and_shows_in_the_table(tmp_path: Path) -> None:
    from rich.console import Console

    from zoplan.profile import apply_profile, load_profile
    from zoplan.cli.render import profile_table

    machine = load_topology("cpu-local")
    tree = yaml.safe_load(write_profile(tmp_path / "base.yaml").read_text())
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(tree))
    for figures in tree["devices"].values():
        figures["duplex_gbps"] = 20.0  # both directions at once reach less than 14 + 13 each
    (tmp_path / "duplex.yaml").write_text(yaml.safe_dump(tree))

    def bus(name: str) -> float:
        measured = apply_profile(machine, load_profile(tmp_path / name), tmp_path / name)
        return sum(s.memory_gbps for s in measured.spec.sockets)

    assert bus("plain.yaml") == pytest.approx(len(machine.gpus) * (14.0 + 13.0))
    assert bus("duplex.yaml") == pytest.approx(len(machine.gpus) * 20.0)
    console = Console(width=200, record=True)
    console.print(profile_table(load_profile(tmp_path / "duplex.yaml")))
    text = console.export_text()
    assert "both directions at once, all devices" in text and "20.0 GB/s in all" in text


def test_a_duplex_cap_lengthens_a_step_whose_uploads_and_write_backs_overlap(tmp_path: Path) -> None:
    tree = yaml.safe_load(write_profile(tmp_path / "base.yaml", topology="h100-pcie-1x").read_text())
    tree["model"]["dtype"] = "bf16"
    del tree["allgather"]  # (one GPU: no all-gather to measure)
    for table in ("block_s", "embed_s", "head_s"):  # fast compute: the copies bound the step
        tree["compute"][table] = {k: 1e-4 for k in tree["compute"][table]}
    tree["compute"]["update_s_per_param"] = 1e-12
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(tree))
    tree["devices"]["gpu0"]["duplex_gbps"] = 20.0  # against 27 + 26 one way at a time
    (tmp_path / "duplex.yaml").write_text(yaml.safe_dump(tree))
    model = str(tmp_path / "my-base")
    pins = Pins(perturbation=1, data=1, micro_batch=2, resident=0, prefetch=1)

    def step(name: str) -> float:
        return plan(
            model, "h100-pcie-1x", global_batch=2, seq_len=64, pins=pins, profile=tmp_path / name
        ).plan.prediction.step_time_s

    assert step("duplex.yaml") > 1.2 * step("plain.yaml")


def _calibration_rows(device: str, machine) -> list[dict]:
    """runtime/calibrate.py's per-rank figures, as build_profile receives them."""
    keys = ("1x1", "1x2", "2x1", "2x2")
    rows = []
    for rank in range(len(machine.gpus)):
        compute = {
            k: {
                "h2d": 1e-3,
                "update": 2e-4,
                "d2h": 1e-3,
                "embed": 1e-3,
                "compute": 3e-3 + i * 1e-3,
                "head": 2e-3,
                "exchange": 0.0,
                "scalar": 0.0,
                "loop": 1e-3,
                "compute_gpu": 2e-3 + i * 1e-3,
                "compute_host": 3e-3 + i * 1e-3,
            }
            for i, k in enumerate(keys)
        }
        compute["1x1"]["perturb_s_per_param"] = 1e-11
        rows.append(
            {
                "rank": rank,
                "device": device,
                "alone": {"h2d_gbps": 50.0, "d2h_gbps": 50.0},
                "together": {"h2d_gbps": 50.0, "d2h_gbps": 50.0, "duplex_gbps": None},
                "allgather": {},
                "allgather_groups": [],
                "scalar_latency_us": 0.0,
                "block_params": 1000,
                "compute": compute,
            }
        )
    return rows


def test_a_gpu_calibration_keeps_block_computes_gpu_and_host_time_and_the_table_shows_both(tmp_path: Path) -> None:
    """block_s is the longer of the two; the profile keeps both for the record on CUDA (where
    the host's issue time is measured apart), and nothing of the kind on the CPU."""
    from rich.console import Console

    from zoplan.profile import build_profile
    from zoplan.cli.render import profile_table

    machine = load_topology("h100-pcie-1x")
    shape = load_model_shape("tiny-opt")
    gpu = build_profile(
        _calibration_rows("cuda:0", machine),
        machine,
        shape,
        micro_batch=2,
        seq_len=64,
        dtype="bf16",
        device="NVIDIA H100",
    )
    assert gpu.compute.block_gpu_s["2x1"] == pytest.approx(4e-3)
    assert gpu.compute.block_host_s["2x1"] == pytest.approx(5e-3)
    assert gpu.compute.block_s["2x1"] == pytest.approx(5e-3)
    console = Console(width=200, record=True)
    console.print(profile_table(gpu))
    text = console.export_text()
    assert "block compute, 2 branch(es), 1 micro-batch(es)" in text
    assert "5.0 ms (GPU 4.0 ms, host 5.0 ms)" in text, text
    cpu = build_profile(
        _calibration_rows("cpu", machine), machine, shape, micro_batch=2, seq_len=64, dtype="bf16", device="cpu"
    )
    assert cpu.compute.block_gpu_s == {} and cpu.compute.block_host_s == {}
    # written out, a CPU profile carries no empty GPU/host tables; a CUDA one keeps them
    from zoplan.profile import load_profile, write_profile as save

    for prof, name in ((cpu, "cpu.yaml"), (gpu, "gpu.yaml")):
        save(prof, tmp_path / name)
    assert "block_gpu_s" not in (tmp_path / "cpu.yaml").read_text()
    assert load_profile(tmp_path / "cpu.yaml").compute.block_gpu_s == {}
    assert load_profile(tmp_path / "gpu.yaml").compute.block_host_s["2x1"] == pytest.approx(5e-3)


def test_a_sampled_duplex_rate_keeps_its_range_and_an_unsampled_profile_keeps_its_hash(tmp_path: Path) -> None:
    """The calibration samples both directions at once several times and reports the median;
    the profile keeps the lowest and highest sample, the table shows them, and a profile without
    samples (CPU ranks, older profiles) writes and hashes as before."""
    from rich.console import Console

    from zoplan.profile import build_profile, load_profile, write_profile as save
    from zoplan.cli.render import profile_table

    machine = load_topology("h100-pcie-1x")
    shape = load_model_shape("tiny-opt")
    rows = _calibration_rows("cuda:0", machine)
    plain = build_profile(rows, machine, shape, micro_batch=2, seq_len=64, dtype="bf16", device="NVIDIA H100")
    samples = [97.8, 87.2, 96.5, 97.1, 98.0]
    rows[0]["together"].update(duplex_gbps=97.1, duplex_samples_gbps=samples)
    sampled = build_profile(rows, machine, shape, micro_batch=2, seq_len=64, dtype="bf16", device="NVIDIA H100")
    assert sampled.devices["gpu0"].duplex_range_gbps == (87.2, 98.0)
    assert plain.devices["gpu0"].duplex_range_gbps is None
    save(plain, tmp_path / "plain.yaml")
    save(sampled, tmp_path / "sampled.yaml")
    assert "duplex_range_gbps" not in (tmp_path / "plain.yaml").read_text()
    assert load_profile(tmp_path / "sampled.yaml").devices["gpu0"].duplex_range_gbps == (87.2, 98.0)
    # the hash of a profile without samples is the one it had before the field existed
    from zoplan.fileio import content_hash

    data = plain.model_dump(mode="json")
    data["compute"].pop("lockstep_s")
    for figures in data["devices"].values():
        del figures["duplex_range_gbps"]
    del data["meeting"]
    assert plain.hash == content_hash(data) != sampled.hash
    console = Console(width=200, record=True)
    console.print(profile_table(sampled))
    assert "97.1 GB/s in all (median; samples 87.2-98.0)" in console.export_text()


def test_cpu_compute_ranks_that_meet_every_block_compute_at_the_calibrated_lockstep_rate(tmp_path: Path) -> None:
    """CPU ranks share cores: with several compute ranks (PertP, data-parallel) the block compute,
    embedding and head take the ratio measured with every rank all-gathering each block against
    each rank alone (1 branch, 2 micro-batches). One compute rank with a relay, or GPUs, keep the
    independent figures; a profile without the lockstep figures plans as before."""
    from zoplan.sim.costs import StepCosts, Workload
    from zoplan.layout import Layout
    from zoplan.profile import apply_profile, load_profile

    def layout(perturbation: int, gpus: tuple[str, ...]) -> Layout:
        return Layout(
            perturbation=perturbation,
            data=1,
            compute_gpus=gpus[:perturbation],
            upload="sliced",
            movers=gpus,
            slices_per_block=2,
            wire_dtype="fp32",
            param_dtype="fp32",
            micro_batch=2,
            prefetch=1,
        )

    costs = {}
    for topology in ("cpu-local", "rtx4090-4x"):
        base = yaml.safe_load(write_profile(tmp_path / f"{topology}.yaml", topology=topology).read_text())
        locked = {
            **base,
            "compute": {
                **base["compute"],
                "lockstep_s": {"block": 0.19 * 1.25, "embed": 0.19 * 1.1, "head": 0.19 * 0.9},
            },
        }
        (tmp_path / f"{topology}-locked.yaml").write_text(yaml.safe_dump(locked))
        machine = load_topology(topology)
        gpus = tuple(machine.gpus[:2])
        work = Workload(load_model_shape("opt-125m"), 4, 64)
        for name in ("", "-locked"):
            profile = load_profile(tmp_path / f"{topology}{name}.yaml")
            on = apply_profile(machine, profile, tmp_path / "p.yaml")
            for p in (1, 2):
                c = StepCosts(on, work, layout(p, gpus))
                costs[topology, name, p] = (c.compute_block_s(gpus[0]), c.embed_s(gpus[0]), c.head_s(gpus[0]))
    ratios = [a / b for a, b in zip(costs["cpu-local", "-locked", 2], costs["cpu-local", "", 2])]
    assert ratios == pytest.approx([1.25, 1.1, 0.9])
    assert costs["cpu-local", "-locked", 1] == costs["cpu-local", "", 1]  # one compute rank and a relay
    assert costs["rtx4090-4x", "-locked", 2] == costs["rtx4090-4x", "", 2]  # GPUs: each its own device
    # the planner's 2x1 step on the CPU grows with it
    model = str(tmp_path / "my-base")
    pins = Pins(
        perturbation=2, data=1, micro_batch=2, resident=0, wire_dtype="fp32", upload="sliced", slices=2, prefetch=1
    )
    step = {
        name: plan(
            model,
            "cpu-local",
            global_batch=4,
            seq_len=64,
            dtype="fp32",
            pins=pins,
            profile=tmp_path / f"cpu-local{name}.yaml",
        ).plan.prediction.step_time_s
        for name in ("", "-locked")
    }
    assert step["-locked"] > step[""] * 1.1


def test_a_calibration_with_several_ranks_keeps_the_lockstep_compute_and_older_profiles_their_hash(
    tmp_path: Path,
) -> None:
    from rich.console import Console

    from zoplan.fileio import content_hash
    from zoplan.profile import build_profile, load_profile, write_profile as save
    from zoplan.cli.render import profile_table

    machine = load_topology("cpu-local")
    shape = load_model_shape("tiny-opt")
    rows = _calibration_rows("cpu", machine)
    for r, rank in zip(rows, (0.0, 2e-3)):
        r["lockstep"] = {"compute": 5e-3 + rank, "embed": 1.5e-3, "head": 2.5e-3}
    locked = build_profile(rows, machine, shape, micro_batch=2, seq_len=64, dtype="fp32", device="cpu")
    assert locked.compute.lockstep_s == pytest.approx({"block": 6e-3, "embed": 1.5e-3, "head": 2.5e-3})
    assert locked.lockstep_factor("block") == pytest.approx(6e-3 / 4e-3)  # the ranks' 1x2 block: 4 ms
    assert locked.lockstep_factor("embed") == pytest.approx(1.5)
    console = Console(width=200, record=True)
    console.print(profile_table(locked))
    assert "all ranks all-gathering each block" in console.export_text()
    save(locked, tmp_path / "locked.yaml")
    assert load_profile(tmp_path / "locked.yaml").compute.lockstep_s["block"] == pytest.approx(6e-3)
    # one rank (or a profile written before it was measured): no table, factor 1, the old hash
    plain = build_profile(
        _calibration_rows("cpu", load_topology("h100-pcie-1x")),
        load_topology("h100-pcie-1x"),
        shape,
        micro_batch=2,
        seq_len=64,
        dtype="fp32",
        device="cpu",
    )
    assert plain.compute.lockstep_s == {} and plain.lockstep_factor("block") == 1.0
    save(plain, tmp_path / "plain.yaml")
    assert "lockstep_s" not in (tmp_path / "plain.yaml").read_text()
    dumped = plain.model_dump(mode="json")
    del dumped["compute"]["lockstep_s"]
    for figures in dumped["devices"].values():  # nor the duplex samples' range (CUDA only)
        del figures["duplex_range_gbps"]
    del dumped["meeting"]  # nor the CPU ranks' meeting (timed with several CPU ranks only)
    assert plain.hash == content_hash(dumped) != locked.hash
    assert "meeting" not in (tmp_path / "plain.yaml").read_text()


def test_cpu_ranks_meet_before_a_whole_block_for_the_wait_alone_with_a_profile_or_without(tmp_path: Path) -> None:
    """CPU ranks meet before each whole block through shared memory (zoplan.runtime.dist
    NodeMeeting): no collective call, only the wait for the other ranks, the topology's
    ``lockstep_wait_us``, which a profile (it times gloo collectives, not this meeting) does not
    replace; GPU ranks pay their collective's latency and in-step wait."""
    import dataclasses

    from tests.sim.test_costs import layout
    from zoplan.profile import apply_profile, load_profile
    from zoplan.sim.costs import StepCosts, Workload

    machine = load_topology("cpu-local")
    wait = machine.gpu_model("rank0").lockstep_wait_us * 1e-6
    assert wait > 0
    whole = dataclasses.replace(layout(pertp=2), upload="whole", movers=("rank0", "rank1"), slices_per_block=1)
    work = Workload(load_model_shape(str(FIXTURE.parent)), 4, 64)
    profiled = apply_profile(machine, load_profile(write_profile(tmp_path / "p.yaml")), tmp_path / "p.yaml")
    for m in (machine, profiled):
        assert StepCosts(m, work, whole).whole_barrier_s() == pytest.approx(wait, rel=1e-12)
    # a profile that timed the meeting in step (the calibration's whole-block setting): its wait,
    # and its loss sum for whole-block layouts (the sliced ones keep the exchange setting's)
    tree = yaml.safe_load((tmp_path / "p.yaml").read_text())
    tree["meeting"] = {"wait_us": 150.0, "scalar_us": 260.0}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(tree))
    met = apply_profile(machine, load_profile(tmp_path / "m.yaml"), tmp_path / "m.yaml")
    assert StepCosts(met, work, whole).whole_barrier_s() == pytest.approx(150e-6, rel=1e-12)
    assert StepCosts(met, work, whole).scalar_allreduce_s() == pytest.approx(260e-6, rel=1e-12)
    assert StepCosts(met, work, layout(pertp=2)).scalar_allreduce_s() == pytest.approx(600e-6, rel=1e-12)
    assert load_profile(tmp_path / "m.yaml").hash != load_profile(tmp_path / "p.yaml").hash
    spec = yaml.safe_load((Path(__file__).parents[1] / "topologies" / "rtx4090-4x.yaml").read_text())
    spec["gpu_models"]["rtx4090-24gb"].update(collective_us=30.0, lockstep_wait_us=7.0)
    (tmp_path / "gpus.yaml").write_text(yaml.safe_dump(spec))
    gpus = load_topology(str(tmp_path / "gpus.yaml"))
    on_gpus = dataclasses.replace(whole, compute_gpus=("gpu0", "gpu1"), movers=("gpu0", "gpu1"))
    assert StepCosts(gpus, work, on_gpus).whole_barrier_s() == pytest.approx(37e-6, rel=1e-12)


@pytest.mark.parametrize(
    "kind,where",
    [
        ("plan", "zo.steps"),
        ("plan", "zo.eps"),
        ("plan", "zo.seed"),
        ("plan", "batch.micro_batch"),
        ("plan", "resident_blocks"),
        ("profile", "compute.block_s.1x1"),
        ("profile", "devices.rank0.h2d_gbps"),
        ("topology", "gpu_models.cpu-rank.tflops.fp32"),
        ("run.json", "lr"),
    ],
)
def test_true_or_false_where_a_number_is_meant_is_refused(tmp_path: Path, kind: str, where: str) -> None:
    """YAML reads `yes` and `true` as booleans, which pydantic took for 1: `steps: true` trained one
    step (exit 0), `resident_blocks: [true]` kept block 1, a profile's `block_s: true` read as one
    second, a topology's `tflops: true` as one TFLOP/s."""
    from zoplan import runconfig
    from zoplan.planfile import load_plan, write_plan
    from zoplan.profile import load_profile

    if kind == "plan":
        write_plan(
            plan("tiny-opt", "cpu-local", global_batch=4, seq_len=32, pins=Pins(resident=1)).plan, tmp_path / "p.yaml"
        )
        tree = yaml.safe_load((tmp_path / "p.yaml").read_text())
        load = load_plan
    elif kind == "profile":
        tree = yaml.safe_load(write_profile(tmp_path / "p.yaml").read_text())
        load = load_profile
    elif kind == "topology":
        tree = yaml.safe_load(Path(__file__).resolve().parents[1].joinpath("topologies", "cpu-local.yaml").read_text())
        load = load_topology
    else:
        tree = {"version": 1, "model": "tiny-opt", "data": "sentiment", "lr": 1e-3}
        load = runconfig.read
    *path, last = where.split(".")
    node = tree
    for key in path:
        node = node[key]
    node[last] = [True] if isinstance(node[last], list) else True
    bad = tmp_path / ("run.json" if kind == "run.json" else "bad.yaml")
    bad.write_text(json.dumps(tree) if kind == "run.json" else yaml.safe_dump(tree))
    with pytest.raises(ZoplanError, match="not true or false"):
        load(bad)


def test_a_lockstep_time_no_measurement_gives_is_refused(tmp_path: Path) -> None:
    """The costs scale a CPU layout's stage by lockstep_s over the 1x2 time: a hand edit of either
    scaled the plan's step a millionfold, exit 0."""
    from zoplan.profile import load_profile

    tree = yaml.safe_load(write_profile(tmp_path / "base.yaml").read_text())
    tree["compute"]["lockstep_s"] = {"block": 0.4}  # twice 1x2's 0.19 s: as measured
    assert load_profile(write_yaml(tmp_path / "good.yaml", tree)).lockstep_factor("block") == pytest.approx(0.4 / 0.19)
    for locked in (1e3, 1e-4):
        tree["compute"]["lockstep_s"] = {"block": locked}
        with pytest.raises(ZoplanError, match="lockstep_s.block"):
            load_profile(write_yaml(tmp_path / "bad.yaml", tree))


def test_a_topology_without_a_peak_rate_is_refused_as_it_loads(tmp_path: Path) -> None:
    """`tflops: {}` under a GPU model loaded, then every plan ended in a ValueError traceback
    (min() of an empty sequence)."""
    tree = yaml.safe_load(Path(__file__).resolve().parents[1].joinpath("topologies", "cpu-local.yaml").read_text())
    tree["gpu_models"]["cpu-rank"]["tflops"] = {}
    with pytest.raises(ZoplanError, match="gpu_models.cpu-rank.tflops"):
        load_topology(write_yaml(tmp_path / "t.yaml", tree))


def test_copy_rates_each_in_bounds_plan_though_their_sum_is_not(tmp_path: Path) -> None:
    """Each rank's rates within 1 PB/s, their sum over the socket beyond it: a pydantic
    ValidationError traceback ("memory_gbps <= 1000000")."""
    tree = yaml.safe_load(write_profile(tmp_path / "base.yaml").read_text())
    for figures in tree["devices"].values():
        figures.update(h2d_gbps_together=600000.0, d2h_gbps_together=600000.0, h2d_gbps=600000.0, d2h_gbps=600000.0)
    profile = str(write_yaml(tmp_path / "p.yaml", tree))
    report = plan(str(tmp_path / "my-base"), "cpu-local", global_batch=4, seq_len=64, dtype="fp32", profile=profile)
    assert math.isfinite(report.search.best.step_time_s) and report.search.best.step_time_s > 0


@pytest.mark.parametrize(
    "where,value,words",
    [
        ("model.seq_len", 100000, "longer than the 2048 positions"),  # stages scaled ~200-fold down
        ("model.micro_batch", 1000000, "model.micro_batch"),
        ("model.dtype", "fp8", "model.dtype"),
        ("allgather.ranks", 3, "an all-gather among 3 ranks"),
    ],
)
def test_what_a_profile_was_measured_at_is_bounded(tmp_path: Path, where: str, value: object, words: str) -> None:
    """The costs scale a profile's times by the tokens of a plan's micro-batch over the profile's
    own: a seq_len of 100000 on a model of 2048 positions, edited by hand, planned every stage
    about 200 times faster, exit 0; an all-gather among 3 ranks on a 2-rank machine was read."""
    tree = yaml.safe_load(write_profile(tmp_path / "base.yaml").read_text())
    *path, last = where.split(".")
    node = tree
    for key in path:
        node = node[key]
    node[last] = value
    profile = str(write_yaml(tmp_path / "bad.yaml", tree))
    with pytest.raises(ZoplanError, match=re.escape(words)):
        plan(str(tmp_path / "my-base"), "cpu-local", global_batch=4, seq_len=64, dtype="fp32", profile=profile)

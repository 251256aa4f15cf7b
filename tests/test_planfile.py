"""Plan files: written, read back strictly, and refused for another model or machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from zoplan.errors import ZoplanError
from zoplan.models import load_model_shape
from zoplan.planfile import ZoSettings, check_plan_matches, load_plan, write_plan
from zoplan.planner import plan
from zoplan.topology import load_topology


@pytest.fixture(scope="module")
def report():
    return plan(
        "opt-1.3b",
        "dgx-a100",
        global_batch=8,
        seq_len=256,
        zo=ZoSettings(eps=1e-3, lr=2e-7, seed=7, steps=50, lr_schedule="cosine"),
    )


def test_plan_round_trips(report, tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    write_plan(report.plan, path)
    loaded = load_plan(path)
    assert loaded == report.plan
    assert loaded.to_layout() == report.search.best.layout
    assert loaded.zo.seed == 7 and loaded.zo.lr_schedule == "cosine"
    assert loaded.model_shape() == load_model_shape("opt-1.3b")
    assert loaded.topology.hash == load_topology("dgx-a100").hash
    assert loaded.prediction.step_time_s == pytest.approx(report.search.best.step_time_s)
    assert loaded.layout.world_size == len(loaded.layout.ranks)


def _edit(report, tmp_path: Path, change) -> Path:
    data = report.plan.model_dump(mode="json")
    change(data)
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d.update(colour="red"), "unknown key 'colour'"),
        (lambda d: d["transfer"].update(wire="bf16"), "unknown key 'transfer.wire'"),
        (lambda d: d.update(version=99), "version 99 is not supported"),
        (lambda d: d["layout"]["ranks"][0].update(gpu="gpu7"), "'layout.ranks' does not follow"),
        (lambda d: d["model"]["shape"].update(layers=3), "'model.hash'"),
        (lambda d: d["zo"].update(eps=-1.0), "zo.eps"),
        (lambda d: d.update(resident_blocks=[999]), "resident_blocks"),
        (lambda d: d["layout"].pop("perturbation"), "missing field 'layout.perturbation'"),
        # a GPU renamed in one list: "'layout.ranks' ('8 entries') is not one per GPU (9)"
        (lambda d: d["layout"]["compute_gpus"].__setitem__(0, "gpu9"), "'layout.compute_gpus' (['gpu9']) names what"),
        (lambda d: d["transfer"].update(movers=["gpu7x"]), "'transfer.movers' (['gpu7x']) names what no entry"),
        # a mover named twice: "4 slices per block do not divide among 3 movers", and its fix misled
        (lambda d: d["transfer"].update(movers=[*d["transfer"]["movers"], d["transfer"]["movers"][0]]), "twice"),
        # as zoplan run bounds --lora-rank and --prefix-tokens (timeline predicted a rank of 100000)
        (lambda d: d["tuning"].update(lora_rank=100000), "tuning.lora_rank"),
        (lambda d: d["tuning"].update(prefix_tokens=5000), "tuning.prefix_tokens"),
    ],
)
def test_edited_plans_are_refused_with_the_field(report, tmp_path: Path, change, message: str) -> None:
    path = _edit(report, tmp_path, change)
    with pytest.raises(ZoplanError) as err:
        load_plan(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_plan_for_another_machine_or_model_is_detected(report) -> None:
    check_plan_matches(report.plan, machine=load_topology("dgx-a100"), shape=load_model_shape("opt-1.3b"))
    with pytest.raises(ZoplanError, match="planned for topology 'dgx-a100'"):
        check_plan_matches(report.plan, machine=load_topology("dgx-h100"))
    with pytest.raises(ZoplanError, match="planned for model 'opt-1.3b'.*layers 24 vs 32, hidden 2048 vs 2560"):
        check_plan_matches(report.plan, shape=load_model_shape("opt-2.7b"))


def test_a_plan_runs_a_checkpoint_of_the_same_shape_under_another_name(tmp_path: Path) -> None:
    """Plan with a preset, run the user's checkpoint directory: only the shape must agree."""
    import json

    fixture = Path(__file__).parent / "fixtures" / "configs" / "opt-125m" / "config.json"
    mine = tmp_path / "my-finetune-base"
    mine.mkdir()
    (mine / "config.json").write_text(fixture.read_text())
    planned = plan("opt-125m", "cpu-local", global_batch=4, seq_len=64, dtype="fp32").plan
    shape = load_model_shape(str(mine))
    assert shape.name == "my-finetune-base" and shape.hash != planned.model.hash
    check_plan_matches(planned, shape=shape)
    config = json.loads(fixture.read_text())
    config["num_hidden_layers"] += 1
    (mine / "config.json").write_text(json.dumps(config))
    with pytest.raises(ZoplanError, match="layers 12 vs 13"):
        check_plan_matches(planned, shape=load_model_shape(str(mine)))


def test_a_plan_edited_beyond_the_machines_memory_is_refused(tmp_path: Path) -> None:
    """Every block made resident by hand: OPT-66B's 64 blocks need 133 GiB on an 80 GiB H100. The
    file passes its own checks (each block exists once); simulating it (timeline, validate) and
    running it are refused, as the planner would never have made it."""
    from zoplan.planner import timeline

    path = tmp_path / "plan.yaml"
    write_plan(plan("opt-66b", "h100-pcie-1x", global_batch=8, seq_len=512).plan, path)
    timeline(path)  # as planned, it fits
    spec = yaml.safe_load(path.read_text())
    spec["resident_blocks"] = list(range(64))
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert len(load_plan(path).resident_blocks) == 64
    with pytest.raises(ZoplanError, match=r"needs 133\.\d GiB on gpu0, which has 80 GiB"):
        timeline(path)


def test_a_file_of_another_kind_is_named_as_what_it_is(report, tmp_path: Path) -> None:
    """A profile given as a plan (or a plan as a profile or a topology) listed every field missing
    or unknown: "missing field 'zoplan'; ... and 16 more"."""
    from zoplan.profile import load_profile

    plan_path = tmp_path / "plan.yaml"
    write_plan(report.plan, plan_path)
    topology = Path(__file__).parents[1] / "topologies" / "dgx-a100.yaml"
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump({"version": 1, "machine": {}, "model": {}, "devices": {}, "compute": {}}))
    for load, path, said in (
        (load_plan, profile, "is a profile file, not a plan"),
        (load_plan, topology, "is a topology file, not a plan"),
        (load_profile, plan_path, "is a plan file, not a profile"),
        (load_topology, plan_path, "is a plan file, not a topology"),
    ):
        with pytest.raises(ZoplanError) as err:
            load(path)
        assert f"{path} {said}" == err.value.message and "writes one" in err.value.fix


def test_a_directory_or_a_binary_file_given_as_a_plan_is_named_with_a_fix(tmp_path: Path) -> None:
    """Both were raw: "[Errno 21] Is a directory", "'utf-8' codec can't decode byte 0x89 ...",
    with no fix."""
    with pytest.raises(ZoplanError, match="is a directory") as said:
        load_plan(tmp_path)
    assert said.value.fix
    (tmp_path / "plan.yaml").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(ZoplanError, match="is not text") as said:
        load_plan(tmp_path / "plan.yaml")
    assert "the plan file meant" in said.value.fix


def test_a_plan_may_be_larger_than_other_files_and_ids_are_bounded(report, tmp_path: Path) -> None:
    """A 4096-GPU plan whose GPU ids were ~140 characters was 1.06 MB: zoplan plan wrote it and
    every reader refused it (other files are read up to 1 MiB). Plans are read up to 16 MiB, and a
    topology's ids are at most 128 characters."""
    from zoplan.limits import MAX_ID_CHARS

    write_plan(report.plan, tmp_path / "p.yaml")
    with open(tmp_path / "p.yaml", "a") as f:
        f.write(("# " + "x" * 1000 + "\n") * 1500)  # 1.5 MB
    assert (tmp_path / "p.yaml").stat().st_size > 1 << 20
    assert load_plan(tmp_path / "p.yaml").layout.world_size == report.plan.layout.world_size
    tree = yaml.safe_load((Path(__file__).resolve().parents[1] / "topologies" / "cpu-local.yaml").read_text())
    text = yaml.safe_dump(tree).replace("rank0", "r" * (MAX_ID_CHARS + 1))
    (tmp_path / "t.yaml").write_text(text)
    with pytest.raises(ZoplanError, match="at most 128 characters"):
        load_topology(tmp_path / "t.yaml")

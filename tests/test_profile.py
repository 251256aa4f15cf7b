"""Which model a calibration profile serves: the shape, not the name (zoplan/profile.py check_profile)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from zoplan.errors import ZoplanError
from zoplan.models import load_model_shape
from zoplan.planner import plan
from zoplan.profile import PROFILE_VERSIONS
from zoplan.topology import load_topology

FIXTURE = Path(__file__).parent / "fixtures" / "configs" / "opt-125m" / "config.json"


def write_profile(path: Path, *, legacy: bool = False) -> Path:
    """A profile of cpu-local measured on a checkpoint directory named 'my-base' of opt-125m's shape."""
    machine = load_topology("cpu-local")
    base = path.parent / "my-base"
    base.mkdir(exist_ok=True)
    (base / "config.json").write_text(FIXTURE.read_text())
    shape = load_model_shape(str(base))
    model = {"name": shape.name, "hash": shape.hash, "micro_batch": 2, "seq_len": 64, "dtype": "fp32"}
    if not legacy:
        model["shape_hash"] = shape.shape_hash
    times = {"1x1": 0.17, "1x2": 0.19, "2x1": 0.22, "2x2": 0.25}
    tree = {"version": PROFILE_VERSIONS[-1], "machine": {"name": machine.name, "hash": machine.hash},
            "model": model, "measured_on": {"host": "test", "device": "cpu"},
            "devices": {g: {"h2d_gbps": 27.0, "d2h_gbps": 26.0, "h2d_gbps_together": 14.0,
                            "d2h_gbps_together": 13.0} for g in machine.gpus},
            "allgather": {"ranks": 2, "latency_us": 300.0, "gbps": 0.9, "wait_us": 500.0},
            "scalar_latency_us": 600.0,
            "compute": {"block_s": times, "embed_s": dict(times), "head_s": dict(times), "update_s_per_param": 2e-8}}
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
    with pytest.raises(ZoplanError, match="holds compute times for model 'my-base'.*not for 'deeper'"):
        plan(str(other), "cpu-local", global_batch=4, seq_len=64, dtype="fp32", profile=profile)


def test_a_profile_without_a_shape_hash_matches_by_name_and_shape(tmp_path: Path) -> None:
    profile = write_profile(tmp_path / "profile.yaml", legacy=True)
    plan(str(tmp_path / "my-base"), "cpu-local", global_batch=4, seq_len=64, dtype="fp32", profile=profile)
    with pytest.raises(ZoplanError, match="holds compute times for model 'my-base'"):
        plan("opt-125m", "cpu-local", global_batch=4, seq_len=64, dtype="fp32", profile=profile)

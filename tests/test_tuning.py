"""Planning an adapter on read-only blocks (zoplan.tuning): what it counts, what the plan says."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from zoplan.cli import app
from zoplan.errors import ZoplanError
from zoplan.models import load_model_shape
from zoplan.planfile import load_plan, write_plan
from zoplan.planner import plan
from zoplan.sim.bound import machine_bound
from zoplan.sim.costs import StepCosts, Workload
from zoplan.topology import load_topology
from zoplan.tuning import FULL, Tuning


def test_adapter_sizes_follow_the_models_projections() -> None:
    opt = load_model_shape("opt-1.3b")  # hidden 2048, no grouped-query attention
    assert Tuning("lora", lora_rank=8).block_params(opt) == 8 * (2048 + 2048) * 2
    llama = load_model_shape("llama-2-70b")  # hidden 8192, 8 key-value heads of 128
    assert Tuning("lora", lora_rank=4).block_params(llama) == 4 * (8192 + 8192) + 4 * (8192 + 1024)
    assert Tuning("prefix", prefix_tokens=5).block_params(llama) == 2 * 5 * 1024
    assert FULL.params(llama) == 0 and not FULL.frozen_base
    with pytest.raises(ZoplanError):
        Tuning("lora", lora_rank=0)


@pytest.mark.parametrize("topology", ["l40s-8x", "dgx-a100", "h100-pcie-1x"])
def test_read_only_blocks_are_never_written_back_and_cost_less(topology: str) -> None:
    machine = load_topology(topology)
    shape = load_model_shape("opt-13b")
    full = plan(shape.name, machine, global_batch=8, seq_len=256)
    lora = plan(shape.name, machine, global_batch=8, seq_len=256, tuning=Tuning("lora"))
    assert lora.plan.prediction.step_time_s < full.plan.prediction.step_time_s
    # the same layout priced both ways: no write-back on any link, less memory
    layout = full.plan.to_layout()
    both = {t.method: StepCosts(machine, Workload(shape, 8, 256, t), layout) for t in (FULL, Tuning("lora"))}
    assert both["lora"].gpu_memory_bytes(layout.compute_gpus[0]) < both["full"].gpu_memory_bytes(layout.compute_gpus[0])
    assert machine_bound(both["lora"]).machine_bound_s <= machine_bound(both["full"]).machine_bound_s
    assert both["lora"].program.frozen and not both["full"].program.frozen
    assert both["lora"].embed_s(layout.compute_gpus[0]) < both["full"].embed_s(layout.compute_gpus[0])


def test_the_plan_file_records_the_adapter_and_a_full_plan_reads_as_before(tmp_path) -> None:
    lora = plan("opt-1.3b", "rtx4090-4x", global_batch=8, seq_len=256, tuning=Tuning("lora", 16, 32.0)).plan
    write_plan(lora, tmp_path / "lora.yaml")
    back = load_plan(tmp_path / "lora.yaml")
    assert back.tuning.to_tuning() == Tuning("lora", 16, 32.0)
    full = plan("opt-1.3b", "rtx4090-4x", global_batch=8, seq_len=256).plan
    write_plan(full, tmp_path / "full.yaml")
    assert "tuning" not in (tmp_path / "full.yaml").read_text()
    assert load_plan(tmp_path / "full.yaml").tuning.to_tuning() == FULL


def test_zoplan_plan_tuning_lora_uses_mezos_rates_and_says_what_it_trains(tmp_path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        app, ["plan", "-m", "opt-1.3b", "-t", "rtx4090-4x", "--tuning", "lora", "-o", str(tmp_path / "p.yaml")]
    )
    assert result.exit_code == 0, result.output
    assert "LoRA (rank 8, alpha 16, on q_proj and v_proj) on read-only blocks" in " ".join(result.output.split())
    written = load_plan(tmp_path / "p.yaml")
    assert (written.zo.lr, written.zo.eps) == (5e-5, 1e-2)  # MeZO's LoRA rates
    as_json = runner.invoke(app, ["plan", "-m", "opt-1.3b", "-t", "rtx4090-4x", "--tuning", "prefix", "--json"])
    assert json.loads(as_json.stdout)["tuning"] == "prefix"  # (its warnings go to stderr)
    bad = runner.invoke(app, ["plan", "--tuning", "lorra"])
    assert bad.exit_code == 2


def test_an_opt_prefix_takes_positions_the_sequence_then_cannot_use(tmp_path) -> None:
    prefix = Tuning("prefix", prefix_tokens=5)
    assert prefix.positions == 5 and FULL.positions == 0 and Tuning("lora").positions == 0
    # OPT-125m learned 2048 positions: 2048 tokens fit alone, not after a prefix of 5
    assert plan("opt-125m", "rtx4090-4x", global_batch=4, seq_len=2048).search.best is not None
    with pytest.raises(ZoplanError) as refused:
        plan("opt-125m", "rtx4090-4x", global_batch=4, seq_len=2048, tuning=prefix)
    assert "2043 positions after the 5 prefix tokens" in str(refused.value)
    assert "--seq-len 2043 or less" in refused.value.fix
    # a prefix of every position leaves no sequence length: said as such, not as a negative length
    # (an OPT of 1024 positions: a prefix is at most 1024 tokens)
    import json
    from pathlib import Path

    config = json.loads((Path(__file__).parent / "fixtures" / "configs" / "opt-125m" / "config.json").read_text())
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    with pytest.raises(ZoplanError) as none_left:
        plan(
            str(tmp_path / "short"),
            "rtx4090-4x",
            global_batch=4,
            seq_len=64,
            tuning=Tuning("prefix", prefix_tokens=1024),
        )
    assert "no position left: the 1024 prefix tokens take all 1024 positions" in str(none_left.value)
    assert "within 1024 (at most 960 prefix tokens with --seq-len 64)" in none_left.value.fix
    with pytest.raises(ZoplanError, match="--prefix-tokens 2048 is more than 1024"):
        Tuning("prefix", prefix_tokens=2048)
    report = plan("opt-125m", "rtx4090-4x", global_batch=4, seq_len=2043, tuning=prefix)
    # a plan file with a longer prefix is refused when read (the runtime would have no position)
    write_plan(report.plan, tmp_path / "p.yaml")
    text = (tmp_path / "p.yaml").read_text()
    assert "prefix_tokens: 5" in text
    (tmp_path / "longer.yaml").write_text(text.replace("prefix_tokens: 5", "prefix_tokens: 6"))
    with pytest.raises(ZoplanError, match="after the 6 prefix tokens"):
        load_plan(tmp_path / "longer.yaml")

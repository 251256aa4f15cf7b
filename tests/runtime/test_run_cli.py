"""`zoplan run` as a user runs it: the default run learns; bad input exits 2 with one message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from zoplan.planfile import load_plan, write_plan
from zoplan.planner import plan
from zoplan.search import Pins


def zoplan(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "zoplan.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


def test_the_default_run_lowers_the_loss_and_writes_a_loadable_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    proc = zoplan("run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    out = tmp_path / "zoplan-run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0] - 0.05  # held-out loss before and after
    train = [r["loss"] for r in rows if "loss" in r]
    assert len(train) == 100 and sum(train[-10:]) < sum(train[:10])
    assert "likely too small" not in proc.stdout + proc.stderr  # its learning rate is not, and it learns
    # the closing lines say what ran: the hyper-parameters and the batch (from the plan)
    assert "with lr 0.001 (constant), eps 0.001, 8 sequences x 64 tokens a step, layout " in proc.stdout
    # the share of padding is recorded per step: none with one sequence per micro-batch, some with
    # several (the bundled sentences differ in length)
    padding = [r["padding"] for r in rows if "loss" in r]
    assert len(padding) == 100 and all(0 <= p < 1 for p in padding)
    assert (max(padding) > 0) == (load_plan(out / "plan.yaml").batch.micro_batch > 1)
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    assert [j["step"] for j in journal] == list(range(100))
    assert set(journal[0]) >= {"step", "seed", "loss_plus", "loss_minus", "projected_grad", "lr", "eps", "weight_decay"}
    load_plan(out / "plan.yaml")
    assert "held-out: loss" in proc.stdout

    # the saved model loads through from_pretrained with the trained weights, not the base ones
    from safetensors.torch import load_file

    from zoplan.runtime.tiny import resolve_model

    saved = load_file(str(out / "model" / "model.safetensors"))
    mask = os.umask(0)
    os.umask(mask)
    assert (out / "model" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask  # not safetensors' 0600
    loaded = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-opt")).state_dict()
    assert saved and all(torch.equal(loaded[n], v) for n, v in saved.items())
    assert any(not torch.equal(base[n], v) for n, v in saved.items())

    # the journal alone rebuilds the trained weights from the base model

    from fuzzkit import console  # the console script's main, in this process: no interpreter start

    code, said = console(["replay", "tiny-opt", str(out / "journal.jsonl"), "-o", str(tmp_path / "rep")])
    assert code == 0, said
    trained, rebuilt = (
        load_file(str(out / "model" / "model.safetensors")),
        load_file(str(tmp_path / "rep" / "model.safetensors")),
    )
    assert all(torch.equal(rebuilt[n], v) for n, v in trained.items())
    # the run's directory alone: its run.json names the base weights
    code, said = console(["replay", str(out), "-o", str(tmp_path / "rep-dir")])
    assert code == 0, said
    assert load_file(str(tmp_path / "rep-dir" / "model.safetensors")).keys() == trained.keys()
    assert all(
        torch.equal(load_file(str(tmp_path / "rep-dir" / "model.safetensors"))[n], v) for n, v in trained.items()
    )
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "journal.jsonl").write_text((out / "journal.jsonl").read_text())
    code, said = console(["replay", str(lone / "journal.jsonl"), "-o", str(tmp_path / "rep-lone")])
    assert code == 2 and "run.json does not exist" in said and "zoplan replay BASE_MODEL" in said, said
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 0}\n' + (out / "journal.jsonl").read_text())
    code, said = console(["replay", "tiny-opt", str(bad), "-o", str(tmp_path / "rep2")])
    assert code == 2 and f"{bad}:1" in said and "Traceback" not in said
    # onto another model the journal would change other weights: plan.yaml beside it says which
    code, said = console(["replay", "tiny-llama", str(out / "journal.jsonl"), "-o", str(tmp_path / "rep3")])
    assert code == 2 and "the base model given is" in said and "Traceback" not in said
    assert not (tmp_path / "rep3").exists()
    if not torch.cuda.is_available():
        code, said = console(
            ["replay", "tiny-opt", str(out / "journal.jsonl"), "-o", str(tmp_path / "rep4"), "--device", "cuda"]
        )
        assert code == 2 and "cannot reach a GPU" in said and "Traceback" not in said


def test_a_plan_for_another_model_is_refused(tmp_path: Path, tiny_dirs) -> None:
    report = plan(str(tiny_dirs["tiny-llama"] / "config.json"), "cpu-local", global_batch=8, seq_len=32, dtype="fp32")
    write_plan(report.plan, tmp_path / "plan.yaml")
    proc = zoplan("run", str(tmp_path / "plan.yaml"), "--model", str(tiny_dirs["tiny-opt"]), "-o", str(tmp_path / "o"))
    assert proc.returncode == 2 and "planned for model" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the plan would run")
def test_a_gpu_plan_on_this_cpu_machine_is_refused(tmp_path: Path, tiny_dirs) -> None:
    report = plan(str(tiny_dirs["tiny-opt"] / "config.json"), "dgx-a100", global_batch=8, seq_len=32)
    write_plan(report.plan, tmp_path / "plan.yaml")
    proc = zoplan("run", str(tmp_path / "plan.yaml"), "--model", str(tiny_dirs["tiny-opt"]), "-o", str(tmp_path / "o"))
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    # validate says the same, its fix once, with how to keep the logs
    proc = zoplan("validate", str(tmp_path / "plan.yaml"), "--model", str(tiny_dirs["tiny-opt"]), "--steps", "3")
    assert proc.returncode == 2 and proc.stderr.count("no CUDA device") == 1, proc.stderr
    assert proc.stderr.count("fix:") == 1 and "pass --output DIR to keep the run (its logs" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "nobody/no-such-model"], "cannot be found offline"),
        (["--global-batch", "7", "--ddp", "2"], "does not divide"),
        (["--steps", "0"], "Invalid value for '--steps'"),
        (["--steps", "1000000000000"], "Invalid value for '--steps'"),
        (["--seed", "-1"], "Invalid value for '--seed'"),
        (["--nnodes", "100000", "--master-port", "29500"], "Invalid value for '--nnodes'"),
        (["--lr", "-1"], "--lr must be more than 0"),
        (["--eps", "1e400"], "--eps must be a finite number"),
        (["--master-port", "99999999"], "Invalid value for '--master-port'"),
        (
            ["--node-rank", "3"],
            "--node-rank 3 is not one of the 1 node(s): 0 .. 0\n  fix: a run over several machines needs --nnodes N",
        ),
        # one machine's ranks meet on it: another address was waited on for the collectives' 10 minutes
        (["--master-addr", "10.1.2.3"], "--master-addr 10.1.2.3 is node 0's address for a run of several machines"),
        (["--max-restarts", "-1"], "--max-restarts"),
        (["--max-nonfinite", "0"], "--max-nonfinite"),
    ],
)
def test_bad_run_arguments_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    proc = zoplan("run", *args, "-o", str(tmp_path / "o"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_a_malformed_data_line_is_named(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "fine", "label": 1}\n{"text": oops}\n')
    proc = zoplan("run", "--data", str(data), "-o", str(tmp_path / "o"))
    assert proc.returncode == 2 and f"{data}:2: invalid JSON" in proc.stderr
    # a label with no label word: named before anything is written (the ranks would find it later)
    data.write_text('{"text": "fine", "label": 1}\n{"text": "odd", "label": 7}\n' * 8)
    proc = zoplan("run", "--data", str(data), "-o", str(tmp_path / "o"))
    assert proc.returncode == 2 and f"{data}:2: label 7, but the task has 2 label words" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_options_the_plan_fixes_are_refused_with_a_plan(tmp_path: Path, tiny_dirs) -> None:
    report = plan(str(tiny_dirs["tiny-opt"] / "config.json"), "cpu-local", global_batch=8, seq_len=32, dtype="fp32")
    write_plan(report.plan, tmp_path / "plan.yaml")
    proc = zoplan(
        "run",
        str(tmp_path / "plan.yaml"),
        "--model",
        str(tiny_dirs["tiny-opt"]),
        "--lr",
        "0.5",
        "--ddp",
        "2",
        "-o",
        str(tmp_path / "o"),
    )
    assert proc.returncode == 2 and "--ddp, --lr set what the plan" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_a_plan_runs_its_own_steps_and_run_json_records_what_the_plan_fixed(tmp_path: Path) -> None:
    """`zoplan run plan.yaml` trains the steps the plan records (`zoplan plan --steps`), its
    learning-rate schedule over them, unless --steps is given, on the plan's model where it is a
    built-in one (it was tiny-opt whatever the plan); run.json records the batch, the machine and
    the hyper-parameters the plan fixed, not the defaults it overrode."""
    made = zoplan(
        *("plan", "-m", "tiny-llama", "-t", "cpu-local", "-b", "4", "-s", "32", "--steps", "3", "--lr", "0.01"),
        *("--lr-schedule", "linear", "-o", str(tmp_path / "plan.yaml")),
    )
    assert made.returncode == 0, made.stderr
    out = tmp_path / "o"
    proc = zoplan("run", str(tmp_path / "plan.yaml"), "--eval-every", "0", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    assert [j["lr"] for j in journal] == pytest.approx([0.01, 0.01 * 2 / 3, 0.01 / 3]), (
        journal
    )  # its last step trains too
    recorded = json.loads((out / "run.json").read_text())
    assert recorded["model"] == "tiny-llama"
    assert {k: recorded[k] for k in ("steps", "global_batch", "seq_len", "lr", "eps", "seed")} == {
        "steps": 3,
        "global_batch": 4,
        "seq_len": 32,
        "lr": 0.01,
        "eps": 1e-3,
        "seed": 0,
    }


def test_a_plan_of_a_model_that_is_not_built_in_needs_its_weights(tmp_path: Path) -> None:
    write_plan(plan("opt-125m", "cpu-local", global_batch=4, seq_len=32, dtype="fp32").plan, tmp_path / "p.yaml")
    proc = zoplan("run", str(tmp_path / "p.yaml"), "-o", str(tmp_path / "o"))
    assert proc.returncode == 2 and "is for model 'opt-125m': say where its weights are" in proc.stderr, proc.stderr
    assert "--model" in proc.stderr and not (tmp_path / "o").exists()


def test_a_previous_runs_output_is_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "journal.jsonl").write_text("precious\n")
    proc = zoplan("run", "-o", str(out))
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert (out / "journal.jsonl").read_text() == "precious\n"
    assert [p.name for p in out.iterdir()] == ["journal.jsonl"]  # refused: not even its lock file left


def test_non_finite_losses_skip_updates_then_stop_the_run(tmp_path: Path) -> None:
    proc = zoplan(
        "run", "--lr", "1e30", "--steps", "40", "--max-nonfinite", "3", "--eval-every", "0", "-o", str(tmp_path / "o")
    )
    assert proc.returncode == 2 and "not finite for 3 steps in a row" in proc.stderr
    # --eval-every 0: nothing is evaluated, not even before the first step
    assert "eval_loss" not in (tmp_path / "o" / "metrics.jsonl").read_text()
    journal = [json.loads(line) for line in (tmp_path / "o" / "journal.jsonl").read_text().splitlines()]
    skipped = [j for j in journal if j["skipped"]]
    assert len(skipped) == 3 and all(j["projected_grad"] == 0.0 for j in skipped)
    # a rank's own stop is not a crash: --max-restarts does not restart it (each restart had reset
    # the count, and a run of nothing but skipped steps ended with exit 0 and the base weights)
    proc = zoplan(
        *("run", "--lr", "1e30", "--steps", "12", "--max-nonfinite", "3", "--max-restarts", "2"),
        *("--eval-every", "0", "-o", str(tmp_path / "r")),
    )
    assert proc.returncode == 2 and "not finite for 3 steps in a row" in proc.stderr, proc.stderr
    assert "restarted" not in proc.stdout + proc.stderr


def test_a_run_whose_every_step_was_skipped_fails(tmp_path: Path) -> None:
    """Fewer steps than --max-nonfinite, each with a loss that is not finite (an eps of 1e308 edited
    into a plan, a LoRA alpha of 1e308): the run ended with exit 0, "3 step(s) skipped", and wrote
    the weights it started from."""
    proc = zoplan("run", "--eps", "1e308", "--steps", "3", "--eval-every", "0", "-o", str(tmp_path / "o"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "not finite in any of the 3 step(s)" in proc.stderr and "nothing was trained" in proc.stderr
    assert not (tmp_path / "o" / "model").exists()


def test_a_node_count_that_differs_from_the_plan_is_reported(tmp_path: Path, tiny_dirs) -> None:
    report = plan(str(tiny_dirs["tiny-opt"] / "config.json"), "cpu-local", global_batch=8, seq_len=32, dtype="fp32")
    write_plan(report.plan, tmp_path / "plan.yaml")
    proc = zoplan(
        "run",
        str(tmp_path / "plan.yaml"),
        "--model",
        str(tiny_dirs["tiny-opt"]),
        "--nnodes",
        "2",
        "--master-port",
        "29777",
        "-o",
        str(tmp_path / "o"),
    )
    assert proc.returncode == 2 and "spans 1 node(s) but --nnodes is 2" in proc.stderr
    assert "fix: run it with --nnodes 1" in proc.stderr
    # without a plan file, the run plans for --nnodes of the topology's nodes: not more than it has
    import yaml

    from zoplan.topology import resolve_topology_path

    spec = yaml.safe_load(resolve_topology_path("cpu-local").read_text())
    spec.update(nodes=2, network={"gbps": 25, "latency_us": 5}, name="two-cpu-nodes")
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(spec))
    proc = zoplan(
        *("run", "--model", str(tiny_dirs["tiny-opt"]), "--topology", str(tmp_path / "two.yaml")),
        *("--nnodes", "3", "--master-port", "29777", "-o", str(tmp_path / "o2")),
    )
    assert proc.returncode == 2 and "--nnodes 3, but the topology 'two-cpu-nodes' is of 2 node(s)" in proc.stderr


def test_a_master_port_in_use_is_named_before_anything_is_written(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = zoplan("run", "--master-port", str(port), "--steps", "1", "-o", str(tmp_path / "o"))
    assert proc.returncode == 2 and f"--master-port {port} is in use on this machine" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_a_master_port_another_launch_holds_is_named_with_its_pid(tmp_path: Path) -> None:
    """Two runs started at once with one --master-port each found it free; then one's ranks met
    the other's at it, and one or both failed with "a rank exited without a message" (or a node
    "started otherwise than node 0" on one machine). A launch holds its port from the start."""
    import socket

    from zoplan.runtime.scratch import port_claimed

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with port_claimed(port):  # (as a launch started a moment before holds it, its ranks not yet listening)
        proc = zoplan("run", "--master-port", str(port), "--steps", "1", "-o", str(tmp_path / "o"))
        again = zoplan("run", "--master-port", str(port), "--steps", "1", "-o", str(tmp_path / "o"))
    said = f"--master-port {port} is taken by another zoplan launch on this machine (pid {os.getpid()})"
    for p in (proc, again):
        assert p.returncode == 2 and said in p.stderr, p.stderr
        assert "Traceback" not in p.stderr and not (tmp_path / "o").exists()
    assert not list(Path(tempfile.gettempdir()).glob(f"zoplan-port-{port}"))  # (released with the launch)


def test_a_port_taken_between_the_launch_s_check_and_rank_0_s_listening_is_named(tmp_path: Path) -> None:
    """A program that took the port after the launch found it free made rank 0 fail in
    init_process_group (EADDRINUSE): the run said only that a rank exited without a message."""
    import socket

    from zoplan.errors import ZoplanError
    from zoplan.runtime import dist as zdist

    made = plan("tiny-opt", "cpu-local", global_batch=2, seq_len=16, pins=Pins(perturbation=1, data=1)).plan
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            mp.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
            try:
                with pytest.raises(ZoplanError, match=f"rank 0 could not listen on port {port}, the run's master port"):
                    zdist.init(made, "cpu")
            finally:
                if torch.distributed.is_initialized():
                    torch.distributed.destroy_process_group()


def test_a_run_that_ends_on_losses_that_are_not_finite_fails_and_one_that_diverged_says_so(tmp_path: Path) -> None:
    """Exit 0 with a NaN model: a run whose last steps (fewer than --max-nonfinite) had losses that
    are not finite wrote the weights that gave them ("held-out: loss 7.23 -> nan"). And a run whose
    loss rose 5 orders of magnitude (lr 0.03) closed without a word: a script saw success."""
    proc = zoplan("run", "--lr", "1", "--steps", "14", "--max-nonfinite", "1000", "-o", str(tmp_path / "nan"))
    assert proc.returncode == 2, proc.stderr
    assert (
        "the run ended on weights whose loss is not finite: its last" in proc.stderr and "Traceback" not in proc.stderr
    )
    assert not (tmp_path / "nan" / "model").exists()
    rows = [json.loads(line) for line in (tmp_path / "nan" / "journal.jsonl").read_text().splitlines()]
    trailing = len(rows) - max((i + 1 for i, row in enumerate(rows) if not row["skipped"]), default=0)
    assert trailing >= 1
    again = zoplan("run", "--resume", str(tmp_path / "nan"))  # (nothing left to train: it wrote those weights)
    said = f"ended on {trailing} step(s) whose losses were not finite"
    assert again.returncode == 2 and said in again.stderr, again.stderr
    assert not (tmp_path / "nan" / "model").exists()
    proc = zoplan("run", "--lr", "0.03", "--steps", "30", "-o", str(tmp_path / "up"))
    assert proc.returncode == 0, proc.stderr
    assert "warning: the held-out loss rose from 7." in proc.stderr and "the run diverged" in proc.stderr
    proc = zoplan("run", "--steps", "4", "-o", str(tmp_path / "fine"))  # (a run that learns: nothing said)
    assert proc.returncode == 0 and "diverged" not in proc.stderr, proc.stderr


def test_an_eps_below_the_compute_dtype_s_resolution_is_said_at_the_start(tmp_path: Path) -> None:
    """bf16 with eps 1e-5: 87% of tiny-opt's block weights unchanged by +eps*z, g the forward's
    rounding noise over 2e-5 (-247 to +131), the held-out loss 7.2 -> 14.1 in 25 steps, exit 0 and
    not a word (no g was exactly 0, which the 20-step check looks for)."""
    from zoplan.runtime.zo import eps_note, unresolved

    block = torch.randn(100_000, generator=torch.Generator().manual_seed(1)) * 0.02
    assert unresolved(block, "bf16", 1e-5) > 0.5 and unresolved(block, "fp32", 1e-5) < 0.001
    said = eps_note(block, "bf16", 1e-5)
    assert said is not None and "below the resolution of bf16" in said and "use --eps 0.001 or more" in said
    assert "wider compute dtype (fp32)" in said
    assert eps_note(block, "bf16", 1e-3) is None and eps_note(block, "fp32", 1e-5) is None
    made = zoplan(
        *("plan", "-m", "tiny-opt", "-t", "cpu-local", "--dtype", "bf16", "--eps", "1e-5", "--steps", "2"),
        *("-o", str(tmp_path / "p.yaml")),
    )
    assert made.returncode == 0, made.stderr
    proc = zoplan("run", str(tmp_path / "p.yaml"), "-o", str(tmp_path / "o"))
    assert proc.returncode == 0 and "eps 1e-05 is below the resolution of bf16" in proc.stderr, proc.stderr


def test_updates_that_round_away_in_a_narrower_host_copy_are_said_with_the_wire_dtype(tmp_path: Path) -> None:
    """A bf16 host copy at lr 1e-8: 98% of the weights never moved in 20 steps; the learning rate's
    warning said "try 10x", which left 98% unmoved again. Said at the end, with the fix that works."""
    proc = zoplan("run", "--wire-dtype", "bf16", "--lr", "1e-8", "--steps", "20", "-o", str(tmp_path / "bf16"))
    assert proc.returncode == 0, proc.stderr
    said = next(line for line in proc.stderr.splitlines() if "of the first block's weights in the host copy" in line)
    assert "(bf16)" in said and "--wire-dtype fp32" in said, said
    proc = zoplan("run", "--steps", "20", "-o", str(tmp_path / "fp32"))  # (a run that learns: nothing said)
    assert proc.returncode == 0 and "host copy (" not in proc.stderr, proc.stderr


def test_held_out_examples_of_their_own(tmp_path: Path) -> None:
    """--eval-data: all of --data trains and the evaluation reads the file given, which must be of
    the same task; --eval-fraction says how much of --data is held out instead, not both."""
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps({"text": f"review number {i}", "label": i % 2}) + "\n" for i in range(16)))
    held.write_text("".join(json.dumps({"text": f"another review {i}", "label": i % 2}) + "\n" for i in range(7)))
    out = tmp_path / "o"
    proc = zoplan("run", "--data", str(train), "--eval-data", str(held), "--steps", "2", "-b", "4", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "rank 0: 16 training examples, 7 held out (from " in (out / "worker-node0.log").read_text()
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert len(evals) == 2  # before the first step and after the last
    assert json.loads((out / "run.json").read_text())["eval_data"] == str(held)
    # refused before anything is written: another task, no examples, a bad label, both options
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "plain text"}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "odd", "label": 5}) + "\n")
    for extra, words in (
        (["--eval-data", str(text)], "is an lm set (records of a text and no label), but --data"),
        (["--eval-data", str(empty)], "holds no examples"),
        (["--eval-data", str(bad)], "label 5, but the task has 2 label words"),
        (["--eval-data", str(tmp_path / "gone.jsonl")], "--eval-data: data file"),  # the option named
        (["--eval-data", str(held), "--eval-fraction", "0.2"], "both say what is held out"),
    ):
        proc = zoplan("run", "--data", str(train), *extra, "-b", "4", "-o", str(tmp_path / "refused"))
        assert proc.returncode == 2 and words in proc.stderr, (extra, proc.stderr)
        assert not (tmp_path / "refused").exists()


def test_classification_with_three_classes_a_prompt_and_label_words(tmp_path: Path) -> None:
    """Any number of classes: label i is the i-th label word, read after the prompt; the run
    records both, and a word the tokenizer splits, or a prompt without {text}, is named."""
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps({"text": f"the story {i}", "label": i % 3}) + "\n" for i in range(24)))
    out = tmp_path / "o"
    args = ("--data", str(data), "--prompt", "{text} It felt", "--label-words", "dull,movie,wonderful", "-b", "4")
    proc = zoplan("run", *args, "--steps", "2", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    recorded = json.loads((out / "run.json").read_text())
    assert (recorded["prompt"], recorded["label_words"]) == ("{text} It felt", ["dull", "movie", "wonderful"])
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert len(evals) == 2 and all(0.0 <= e["eval_accuracy"] <= 1.0 for e in evals)
    # a label past the words is refused before anything is written; so is a prompt without {text}
    proc = zoplan("run", *args[:4], "--label-words", "dull,movie", "-b", "4", "-o", str(tmp_path / "r1"))
    assert proc.returncode == 2 and "label 2, but the task has 2 label words" in proc.stderr
    proc = zoplan("run", *args[:2], "--prompt", "It felt", "-o", str(tmp_path / "r2"))
    assert proc.returncode == 2 and "--prompt: " in proc.stderr and "{text} placeholder" in proc.stderr
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()
    # a word the tokenizer splits into pieces: the ranks say which
    proc = zoplan(
        "run", *args[:4], "--label-words", "dull,movie,okay", "-b", "4", "--steps", "1", "-o", str(tmp_path / "r3")
    )
    assert proc.returncode == 2 and "label word ' okay' is 3 tokens" in proc.stderr, proc.stderr
    # found by the ranks, before the first step: the output directory the run made goes again, so
    # the same command with other words runs (it was left for the user to remove)
    assert not (tmp_path / "r3").exists()


def sentiment_records(shape) -> list[dict]:
    """200 bundled sentiment examples, each made into a record by ``shape(text, label)``."""
    from zoplan.runtime.data import make_sentiment

    return [shape(r["text"] + " It was", r["label"]) for r in make_sentiment(200, seed=3)]


def trained_20_steps(tmp_path: Path, records: list[dict]) -> tuple[Path, list[dict]]:
    """A 20-step run on ``records`` whose held-out loss falls; its data file and evaluations."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "o"
    proc = zoplan("run", "--data", str(data), "--steps", "20", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert len(evals) == 2 and evals[1]["eval_loss"] < evals[0]["eval_loss"] - 0.3, evals
    return data, evals


def test_a_completion_only_run_learns_its_completions(tmp_path: Path) -> None:
    """{prompt, completion} records: the loss is the completion's (and its end's) only; the
    held-out loss falls; options of a classification are refused for such data."""
    data, _ = trained_20_steps(
        tmp_path, sentiment_records(lambda text, label: {"prompt": text, "completion": (" terrible", " great")[label]})
    )
    for option, value in (("--prompt", "{text} So"), ("--label-words", "bad,good")):
        proc = zoplan("run", "--data", str(data), option, value, "-o", str(tmp_path / "refused"))
        assert proc.returncode == 2 and f"{option} applies to classification (labelled) data" in proc.stderr
        assert "is a completion set (records of a prompt and a completion)" in proc.stderr
    assert not (tmp_path / "refused").exists()


def test_a_multiple_choice_run_trains_on_the_right_choices_and_scores_all(tmp_path: Path) -> None:
    """{prompt, choices, label} records: trained as completions by the right choice, evaluated by
    scoring every choice (accuracy: examples answered right); a --eval-data set of another shape
    is refused."""
    choices = [" terrible", " great", " fine"]
    data, evals = trained_20_steps(
        tmp_path, sentiment_records(lambda text, label: {"prompt": text, "choices": choices, "label": label})
    )
    held = round(200 * 0.1)
    assert all(e["eval_accuracy"] * held == pytest.approx(round(e["eval_accuracy"] * held)) for e in evals)  # examples
    proc = zoplan("run", "--data", str(data), "--eval-data", "sentiment", "-o", str(tmp_path / "refused"))
    assert (
        proc.returncode == 2
        and "is a classification set (records of a text (or fields a prompt names) and a label), but --data"
        in proc.stderr
    )


def test_a_recipe_gives_its_prompt_words_and_hyper_parameters_unless_given(tmp_path: Path) -> None:
    """--recipe sst2 reads {"sentence", "label"} records with MeZO's prompt, label words, lr, eps
    and batch; an option given wins; a recipe for other records, or an unknown one, is refused."""
    records = sentiment_records(lambda text, label: {"sentence": text.removesuffix(" It was"), "label": label})
    data = tmp_path / "sst2.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "o"
    proc = zoplan("run", "--data", str(data), "--recipe", "sst2", "--steps", "2", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    recorded = json.loads((out / "run.json").read_text())
    assert recorded["recipe"] == "sst2" and recorded["prompt"] == "{sentence} It was"
    assert recorded["label_words"] == ["terrible", "great"]
    assert "with lr 1e-06 (constant), eps 0.001, 16 sequences x 64 tokens a step" in proc.stdout
    assert "MeZO's sst2 recipe" in proc.stdout
    proc = zoplan(
        "run", "--data", str(data), "--recipe", "sst2", "--lr", "1e-3", "--steps", "1", "-o", str(tmp_path / "o2")
    )
    assert proc.returncode == 0 and "with lr 0.001 (constant), eps 0.001, 16 sequences" in proc.stdout, proc.stderr
    for recipe, words in (("copa", "recipe copa reads choice records"), ("sst3", "did you mean 'sst2'")):
        proc = zoplan("run", "--data", str(data), "--recipe", recipe, "-o", str(tmp_path / "refused"))
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr
    assert not (tmp_path / "refused").exists()


def test_a_damaged_journal_is_refused_before_torch_is_imported(tmp_path: Path) -> None:
    """`zoplan replay` of a journal it cannot trust answers at once: torch's import (seconds) comes
    after the check."""
    bad = tmp_path / "journal.jsonl"
    bad.write_text('{"step": 0}\n')
    code = (
        "import sys\nfrom zoplan import cli\nsys.argv = ['zoplan', 'replay', 'tiny-opt', sys.argv[1], '-o', sys.argv[2]]\n"
        "try:\n    cli.main()\nexcept SystemExit as exc:\n    print('exit', exc.code, 'torch' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(bad), str(tmp_path / "out")], capture_output=True, text=True, timeout=120
    )
    assert proc.stdout.strip() == "exit 2 False", proc.stdout + proc.stderr
    assert f"{bad}:1" in proc.stderr and not (tmp_path / "out").exists()


def test_the_progress_of_a_resume_starts_at_the_steps_its_journal_holds(tmp_path: Path, capsys, monkeypatch) -> None:
    """It showed step 0/N until the ranks had loaded and said where they resumed (seconds, or
    minutes for a large model)."""
    import rich.progress
    from rich.console import Console

    from zoplan.runconfig import make
    from zoplan.runtime import launch

    class Ended:  # the ranks' process, already ended: the display draws once and stops
        def poll(self) -> int:
            return 0

    cfg = make(model="tiny-opt", steps=200, output=tmp_path)
    (tmp_path / "journal.jsonl").write_text("{}\n" * 4)
    (tmp_path / "metrics.jsonl").write_text("")
    console, made = Console(file=sys.stdout, force_terminal=False, width=100), rich.progress.Progress
    monkeypatch.setattr(rich.progress, "Progress", lambda *columns, **kw: made(*columns, console=console, **kw))
    launch._follow(Ended(), tmp_path / "metrics.jsonl", cfg)
    shown = capsys.readouterr().out
    assert "step 4/200" in shown and "step 0/200" not in shown, shown


def test_a_node_waiting_for_node_0_says_it_may_be_one_too_many() -> None:
    """A node started again for a run whose nodes have all met waits at node 0's address (the run
    goes on without it): its note said only to start node 0 there, which runs already."""
    from zoplan.runconfig import make
    from zoplan.runtime.launch import _waiting_note

    said = _waiting_note(make(model="m", nnodes=3, node_rank=2, master_addr="10.0.0.1"), 29500)
    assert said.startswith("node 2 of 3: waiting for node 0 at 10.0.0.1:29500") and "--node-rank 0" in said
    assert "if a run there already has its node 2, this one is one too many" in said
    first = _waiting_note(make(model="m", nnodes=3, node_rank=0, master_addr="10.0.0.1"), 29500)
    assert "--node-rank K (1 .. 2) --master-addr 10.0.0.1 --master-port 29500" in first and "too many" not in first


def test_a_stop_that_comes_when_the_run_has_finished_says_so(tmp_path: Path, monkeypatch) -> None:
    """A launcher stopped while its supervisor could not stop the ranks in time (stopped itself,
    say) waited, the ranks finished, and it said "stopped by SIGTERM after 3 completed step(s) of
    3" with a resume of a finished run, status 143. A stop that finds the run finished says so
    and gives the run's summary."""
    from zoplan.runconfig import make
    from zoplan.runtime import launch

    real = launch._follow

    def then_stopped(proc, *args, **kwargs):
        real(proc, *args, **kwargs)  # until the ranks have finished
        raise KeyboardInterrupt  # Ctrl-C, or SIGTERM through the launcher's handler

    monkeypatch.setattr(launch, "_follow", then_stopped)
    said: list[str] = []
    with launch.warnings_to(said.append):
        summary = launch.run(make(model="tiny-opt", steps=3, output=tmp_path / "run", quiet=True))
    assert summary.steps == 3 and (tmp_path / "run" / "model").is_dir()
    assert said == ["SIGINT came when the run had finished on every rank: its weights and journal are complete"]


def test_a_relative_output_that_starts_with_a_dash_trains_and_resumes(tmp_path: Path) -> None:
    """`-o ./-run` reached the ranks as "-run/run.json", an option to their parser: every start and
    every resume failed ("a rank exited without a message"), and a resume of a finished run left its
    model/ moved aside."""
    done = zoplan("run", "--steps", "2", "-o", "./-run", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    done = zoplan("run", "--resume", "./-run", "--steps", "3", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len((tmp_path / "-run" / "journal.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "-run" / "model" / "model.safetensors").is_file()


def test_a_switch_set_to_a_value_it_does_not_take_is_said(monkeypatch, capsys) -> None:
    """ZOPLAN_MEETINGS=GLOO (or ZOPLAN_Z_KERNEL=Torch) was ignored without a word; a
    ZOPLAN_FAULTS the ranks cannot read failed them "without a message"."""
    from zoplan.errors import ZoplanError
    from zoplan.runtime.launch import check_switches

    check_switches({"ZOPLAN_MEETINGS": "gloo", "ZOPLAN_Z_KERNEL": "torch", "ZOPLAN_CUDA_GRAPHS": "0"})
    assert capsys.readouterr().err == ""
    check_switches({"ZOPLAN_MEETINGS": "GLOO", "ZOPLAN_Z_KERNEL": "Torch"})
    said = capsys.readouterr().err
    assert "ZOPLAN_MEETINGS='GLOO' is not a value zoplan knows (gloo, or unset): it is ignored" in said
    assert "ZOPLAN_Z_KERNEL='Torch'" in said
    with pytest.raises(ZoplanError, match="ZOPLAN_FAULTS: 'garbage' is not POINT:RANK"):
        check_switches({"ZOPLAN_FAULTS": "garbage"})


def test_a_prompt_read_under_an_ascii_locale_says_the_locale_is_the_cause(tmp_path: Path) -> None:
    """Under LC_ALL=C a UTF-8 --prompt reaches Python as bytes it cannot decode: the refusal said
    "give it in UTF-8", which it was; it now names the locale and what to set."""
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "zoplan.cli", "run", "--prompt", "{text} C'était", "--steps", "1", "-o", "run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2 and "this shell's locale is not UTF-8: run with PYTHONUTF8=1" in done.stderr, (
        done.stderr
    )
    assert not (tmp_path / "run").exists()


def test_a_refused_run_removes_the_folders_it_made_and_a_quoted_tilde_is_said(tmp_path: Path) -> None:
    """-o s1/s2/s3 with a missing --data left s1 and s1/s2 behind; -o '~/x' (quoted) made a folder
    named '~' here and said "wrote ~/x/model", which reads as the home folder."""
    done = zoplan("run", "--data", "missing.jsonl", "--steps", "1", "-o", "s1/s2/s3", cwd=tmp_path)
    assert done.returncode == 2 and not (tmp_path / "s1").exists(), done.stderr
    (tmp_path / "kept").mkdir()
    done = zoplan("run", "--data", "missing.jsonl", "--steps", "1", "-o", "kept/s2/s3", cwd=tmp_path)
    assert done.returncode == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert list((tmp_path / "kept").iterdir()) == []
    done = zoplan("run", "--data", "missing.jsonl", "--steps", "1", "-o", "~/x", cwd=tmp_path)
    assert "makes a folder named '~' in" in done.stderr and "not in a home folder" in done.stderr, done.stderr


def test_a_run_over_nodes_that_ends_without_a_word_says_why_from_its_log(tmp_path: Path) -> None:
    """A node whose peers never came (torchrun's rendezvous gives up after 900 s), or whose peer
    stopped before they met (the store's 600 s), or went quiet mid-run (a rank of it stopped: the
    collective's 10-minute timeout), ended with "a rank exited without a message" and a --resume
    fix (for a run that never met, whose other directory was gone); the cause was in the log only."""
    from zoplan.errors import ZoplanError
    from zoplan.runconfig import make
    from zoplan.runtime.launch import NothingDone, _nodes_trouble

    cfg = make(output=tmp_path / "n0", nnodes=2, node_rank=0, master_port=29700)
    log, held, resume = tmp_path / "worker-node0.log", "the journal holds 0 completed step(s)", "continue with X"
    never = _nodes_trouble(cfg, log, "DistStoreError: wait timeout after 600000ms", True, held, resume)
    assert isinstance(never, NothingDone) and "never all met" in never.message and "is removed" in never.message
    assert "start the same command on every node" in never.fix and "--resume" not in never.fix
    quiet = _nodes_trouble(cfg, log, "RuntimeError: [..] Timed out waiting 600000ms for recv", False, held, resume)
    assert isinstance(quiet, ZoplanError) and "stopped answering for 10 minutes" in quiet.message
    assert quiet.fix.endswith(resume)
    lost = _nodes_trouble(cfg, log, "Connection reset by peer", False, held, resume)
    assert lost is not None and "lost its connection" in lost.message
    assert _nodes_trouble(cfg, log, "something else", False, held, resume) is None
    assert _nodes_trouble(make(output=tmp_path / "one"), log, "DistStoreError", True, held, resume) is None


def test_a_rank_writes_each_log_line_in_one_call(monkeypatch) -> None:
    """The ranks share one log (their stderr): print wrote a line and its newline apart, so two
    ranks starting at once left their start lines joined ("... elements hererank 1: ...")."""
    import sys

    from zoplan.runtime import worker

    class Recording:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def write(self, text: str) -> int:
            self.calls.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    recording = Recording()
    monkeypatch.setattr(sys, "stderr", recording)
    worker._log("rank 1: compute on cpu")
    assert recording.calls == ["rank 1: compute on cpu\n"]

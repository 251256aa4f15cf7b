"""Integrity before trust: a record read back is checked for what it means before any rank starts,
and weights that are not finite are never written.

A resume of a damaged run directory is refused by the launcher (status 2, the file and line, a
fix), never cut silently, retrained or turned into NaN weights with exit 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fuzzkit import fuzz_settings, mutate_bytes
from zoplan.errors import ZoplanError
from zoplan.planfile import write_plan
from zoplan.planner import plan as make_plan
from zoplan.runconfig import make
from zoplan.runtime.launch import prepare, resume_config
from zoplan.runtime.journal import read_journal
from zoplan.runtime.replay import replay_to, require_finite
from zoplan.runtime.snapshots import read_valid_journal


def line(step: int, **fields) -> str:
    """A journal line that holds together (journal.check_lines) with a plan of the default ZO
    settings (seed 0, lr 1e-6, eps 1e-3, no weight decay); a ``projected_grad`` given comes from losses that
    give it (a string: as given, for the checks of the line's types)."""
    from zoplan.runtime.perturb import step_seed

    row: dict = {
        "step": step,
        "seed": step_seed(0, step),
        "loss_plus": 7.0,
        "loss_minus": 7.1,
        "lr": 1e-6,
        "eps": 1e-3,
        "weight_decay": 0.0,
        "skipped": False,
    }
    wanted = fields.pop("projected_grad", None)
    if isinstance(wanted, float):
        row["loss_plus"], row["loss_minus"] = wanted * 2 * row["eps"], 0.0
    row.update(fields)
    g = (row["loss_plus"] - row["loss_minus"]) / (2 * row["eps"])
    row["projected_grad"] = wanted if isinstance(wanted, str) else g
    return json.dumps(row) + "\n"


def journal(steps: int = 6) -> str:
    return "".join(line(s) for s in range(steps))


def with_plan(journal_path: Path, model_dir: Path) -> Path:
    """A full-parameter fp32 run's plan.yaml beside ``journal_path``: replay refuses a journal
    without its run's plan (its lines do not say what was trained, nor in which dtypes)."""
    report = make_plan(str(model_dir / "config.json"), "cpu-local", global_batch=4, seq_len=32, dtype="fp32")
    write_plan(report.plan, journal_path.parent / "plan.yaml")
    return journal_path


def finished_run(out: Path, model_dir: Path) -> Path:
    """A finished 6-step run's directory, as far as resuming reads it: plan, run.json, journal."""
    out.mkdir()
    report = make_plan(str(model_dir / "config.json"), "cpu-local", global_batch=4, seq_len=32, dtype="fp32")
    write_plan(report.plan, out / "plan.yaml")
    (out / "run.json").write_text(json.dumps({"model": str(model_dir), "data": "sentiment"}))
    (out / "journal.jsonl").write_text(journal())
    return out


@pytest.fixture
def run_dir(tiny_dirs, tmp_path: Path) -> Path:
    return finished_run(tmp_path / "run", tiny_dirs["tiny-opt"])


def resume(out: Path, steps: int) -> None:
    prepare(resume_config(out, {"steps": steps})[0], resume=True)


def test_a_resume_whose_recorded_data_file_is_gone_says_so_before_the_ranks_start(run_dir: Path) -> None:
    """The ranks said "data file ... does not exist" with the fix of a new run's --data, which a
    resume ignores, and left error.json behind."""
    gone = run_dir.parent / "data.jsonl"  # (--eval-data's recorded file is checked the same way)
    recorded = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**recorded, "data": str(gone)}))
    with pytest.raises(ZoplanError, match=rf"{gone}, the --data the run in .* trained with, is gone") as said:
        resume(run_dir, 6)
    assert f"put the file back at {gone}" in said.value.fix and not (run_dir / "error.json").exists()


def test_a_run_that_keeps_its_data_in_its_directory_resumes_after_the_directory_moved(run_dir: Path) -> None:
    """--data long-text is written into the run's directory and recorded by its absolute path: a
    moved directory was refused ("put the file back at OLD/long-text.jsonl", the file beside it)."""
    from zoplan.runtime import data as zdata

    kept = zdata.write_long_text(run_dir / "long-text.jsonl", 32, records=8)
    stamp = zdata.examples_stamp(zdata.load_examples(str(kept))[0])
    before = run_dir.parent / "before-the-move" / "long-text.jsonl"  # where it was recorded
    recorded = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**recorded, "version": 1, "data": str(before), "data_stamp": stamp}))
    resume(run_dir, 6)
    assert json.loads((run_dir / "run.json").read_text())["data"] == str(kept.resolve())
    # a file of that name that holds other examples is not taken for it
    (run_dir / "run.json").write_text(
        json.dumps({**recorded, "version": 1, "data": str(before), "data_stamp": "sha256:0"})
    )
    with pytest.raises(ZoplanError, match="holds other examples than it did"):
        resume(run_dir, 6)


def test_a_resume_on_other_examples_than_the_run_trained_with_is_refused(run_dir: Path) -> None:
    """run.json records a fingerprint of the examples of --data and --eval-data: a file edited
    since (a record changed, added or moved) is refused, as other weights are; blank lines are not
    examples and may come and go."""
    from zoplan.runtime.data import examples_stamp, load_examples

    records = [{"text": f"review {i}", "label": i % 2} for i in range(8)]
    data, held = run_dir.parent / "data.jsonl", run_dir.parent / "held.jsonl"

    def write(path: Path, rows: list[dict[str, object]], blank: bool = False) -> None:
        path.write_text("".join(json.dumps(r) + "\n" + ("\n" if blank else "") for r in rows))

    write(data, records)
    write(held, records[:4])
    recorded = json.loads((run_dir / "run.json").read_text())
    stamps = {"data_stamp": examples_stamp(load_examples(str(data))[0])}
    stamps["eval_data_stamp"] = examples_stamp(load_examples(str(held))[0])
    new = {**recorded, "version": 1, "data": str(data), "eval_data": str(held), **stamps}
    (run_dir / "run.json").write_text(json.dumps(new))
    resume(run_dir, 6)
    write(data, records, blank=True)
    resume(run_dir, 6)
    for changed in (
        [*records[:3], {"text": "review 3!", "label": 1}, *records[4:]],
        [*records, {"text": "one more", "label": 0}],
        [records[1], records[0], *records[2:]],
    ):
        write(data, changed)
        with pytest.raises(ZoplanError, match=rf"{data}, the --data the run in .* holds other examples") as said:
            resume(run_dir, 6)
        assert "put the file back as it was" in said.value.fix
    write(data, records)
    write(held, records[1:5])
    with pytest.raises(ZoplanError, match=rf"{held}, the --eval-data the run in .* holds other examples"):
        resume(run_dir, 6)


def test_the_ranks_refuse_examples_or_weights_changed_since_the_launcher_recorded_them(tiny_dirs, tmp_path) -> None:
    """The ranks read --data again seconds after the launcher recorded it, and again at a restart
    after a rank failed, and the weights from the model directory where no snapshot holds them:
    anything changed meanwhile would train, exit 0, on other examples or weights than run.json
    records. The check passes on what was recorded, and names what changed."""
    import shutil

    from zoplan.runconfig import RunConfig
    from zoplan.runtime.checkpoint import weights_stamp
    from zoplan.runtime.data import examples_stamp, load_examples
    from zoplan.runtime.worker import check_inputs

    model = tmp_path / "model"
    shutil.copytree(tiny_dirs["tiny-opt"], model)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"review {i}", "label": i % 2}) + "\n" for i in range(8)))
    examples = load_examples(str(data))[0]
    cfg = RunConfig(
        model=str(model), data=str(data), model_weights=weights_stamp(model), data_stamp=examples_stamp(examples)
    )
    out = tmp_path / "run"
    check_inputs(cfg, out, examples, None, model)  # as recorded
    grown = load_examples(str(data))[0] + [examples[0]]
    with pytest.raises(ZoplanError, match=rf"{data}, the --data of the run in .* changed while the run") as said:
        check_inputs(cfg, out, grown, None, model)
    assert "(9 examples now)" in said.value.message and f"zoplan run --resume {out}" in said.value.fix
    # a new run before its first step: the launcher removes what it wrote, so no resume is offered
    with pytest.raises(ZoplanError, match="changed while the run") as said:
        check_inputs(cfg, out, grown, None, model, done=0)
    assert "continue with the same command once it is back as it was" in said.value.fix
    assert "--resume" not in said.value.fix
    weights = model / "model.safetensors"
    other = bytearray(weights.read_bytes())
    other[-64:] = bytes(64)
    weights.write_bytes(bytes(other))
    with pytest.raises(ZoplanError, match=rf"the weights in {model} changed while the run"):
        check_inputs(cfg, out, examples, None, model)
    check_inputs(cfg, out, examples, None, None)  # weights from a snapshot: the directory's are not read


def test_a_resume_removes_a_snapshot_whose_writing_was_interrupted(run_dir: Path) -> None:
    """Ctrl-C while rank 0 wrote a snapshot left snapshots/step-N.tmp, and it stayed there after
    every later resume."""
    torn = run_dir / "snapshots" / "step-00000004.tmp"
    torn.mkdir(parents=True)
    (torn / "model.safetensors").write_bytes(b"half")
    resume(run_dir, 6)
    assert not torn.exists() and (run_dir / "snapshots").is_dir()


def test_a_torn_last_line_is_said_once(tmp_path: Path, capsys) -> None:
    """zoplan replay reads the journal twice (a check before torch is imported, then the replay):
    the first reading is silent, so the warning comes once."""
    path = tmp_path / "journal.jsonl"
    path.write_text(journal(3) + line(3)[:25])
    assert len(read_journal(path, first=0, warn=False)) == 3 and capsys.readouterr().err == ""
    assert len(read_journal(path, first=0)) == 3
    assert capsys.readouterr().err.count("dropped a torn last line") == 1


def test_an_intact_journal_resumes_and_a_torn_last_line_is_cut(run_dir: Path) -> None:
    resume(run_dir, 6)  # nothing to train, but nothing wrong either
    resume(run_dir, 9)
    path = run_dir / "journal.jsonl"
    path.write_text(journal() + line(6)[:25])  # a power loss while writing step 6
    resume(run_dir, 9)
    assert [r["step"] for r in read_valid_journal(path)] == list(range(6))
    assert path.read_text() == journal()  # cut, so that the next append starts a clean line


@pytest.mark.parametrize(
    "edit,words",
    [
        ({"projected_grad": 1.5 * -50.00000000000036}, "its projected gradient"),
        ({"skipped": True}, "it says skipped: true, but its losses are finite"),
        ({"seed": 12345}, "its seed 12345 is not step 3's of the run's seed 0"),
        ({"eps": 2e-3}, "its eps 0.002 is not the plan's 0.001"),
        ({"weight_decay": 0.1}, "its weight decay 0.1 is not the plan's 0.0"),
        ({"lr": -1000.0}, "its learning rate -1000.0 is not the plan's 1e-06 at step 3"),
        ({"lr": 0.0}, "its learning rate 0.0 is not the plan's 1e-06 at step 3"),
        ({"eps": None}, "it has its losses but not the eps"),
    ],
)
def test_a_journal_line_edited_by_hand_is_refused_on_resume_and_replay(
    run_dir: Path, tiny_dirs, tmp_path: Path, edit: dict, words: str
) -> None:
    """A line's projected gradient is its own losses' (L+ - L-) / 2 eps, its seed the step's, its
    learning rate, eps and weight decay the plan's: a number changed (a learning rate of -1000
    blew the loss up to 1e9, exit 0), a field taken out or `skipped` flipped by hand replayed
    (exit 0) to weights no run trained."""
    path = run_dir / "journal.jsonl"
    rows = [json.loads(text) for text in journal().splitlines()]
    rows[3].update(edit)
    rows[3] = {k: v for k, v in rows[3].items() if v is not None}  # (None: the field taken out)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ZoplanError, match=f"the line of step 3 does not hold together: {words}") as said:
        resume(run_dir, 6)
    assert "head -n 3" in said.value.fix
    with pytest.raises(ZoplanError, match=words):
        replay_to(str(tiny_dirs["tiny-opt"]), path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


DAMAGE = {
    # name: (journal text, the refusal's words)
    "non-finite gradient": (
        journal(5) + line(5, projected_grad=float("nan")),
        "journal.jsonl:6: not a journal line ('projected_grad' must be a finite number)",
    ),
    "infinite lr": (journal(3) + line(3, lr=float("inf")) + line(4), "journal.jsonl:4: not a journal line ('lr'"),
    "a string gradient": (journal(5) + line(5, projected_grad="abc"), "journal.jsonl:6: not a journal line"),
    "a torn line in the middle": (
        journal(2) + line(2)[:20] + "\n" + "".join(line(s) for s in range(3, 6)),
        "journal.jsonl:3: not a journal line",
    ),
    "a missing line": (journal(4) + line(5), "journal.jsonl:5: line 5 is step 5, expected step 4"),
    "a missing first line": (
        "".join(line(s) for s in range(1, 6)),
        "journal.jsonl:1: the first line is step 1, expected step 0",
    ),
    "a repeated line": (journal(4) + line(3) + line(4), "journal.jsonl:5: line 5 is step 3, expected step 4"),
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_a_damaged_journal_is_refused_before_any_rank_starts(run_dir: Path, name: str) -> None:
    text, words = DAMAGE[name]
    path = run_dir / "journal.jsonl"
    path.write_text(text)
    with pytest.raises(ZoplanError) as caught:
        resume(run_dir, 9)
    assert words in str(caught.value)
    assert caught.value.status == 2 and caught.value.fix
    assert path.read_text() == text  # refused, not cut
    with pytest.raises(ZoplanError):  # and the ranks' own reader agrees
        read_valid_journal(path)


def test_a_damaged_journal_is_refused_without_loading_torch(run_dir: Path) -> None:
    """The refusal comes from the launcher's own reading (journal, plan, run record), before torch is
    imported: a user with a damaged run directory hears about it at once, not after seconds."""
    (run_dir / "journal.jsonl").write_text(DAMAGE["a missing line"][0])
    probe = (
        "import sys\nfrom zoplan.cli import main\nsys.argv = ['zoplan', 'run', '--resume', sys.argv[1], "
        "'--steps', '9']\ntry:\n    main()\nfinally:\n    print('torch loaded:', 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(run_dir)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "line 5 is step 5, expected step 4" in done.stderr
    assert "torch loaded: False" in done.stdout


def test_a_damaged_lines_fix_keeps_the_steps_before_it(run_dir: Path) -> None:
    path = run_dir / "journal.jsonl"
    path.write_text(journal(3) + "garbage\n" + line(4))
    with pytest.raises(ZoplanError) as caught:
        resume(run_dir, 9)
    assert f"head -n 3 {path}" in caught.value.fix


@pytest.mark.parametrize("steps", [-5, 0, 4])
def test_resume_steps_must_be_the_total_and_at_least_what_is_done(run_dir: Path, steps: int) -> None:
    with pytest.raises(ZoplanError) as caught:
        resume(run_dir, steps)
    message = str(caught.value)
    assert ("fewer than the 6 step(s)" in message) if steps > 0 else ("at least 1" in message)


def test_a_resume_keeps_the_total_a_learning_rate_schedule_was_taken_over(tiny_dirs, tmp_path: Path) -> None:
    """A cosine schedule's rate at a step depends on the run's total: a resume with another
    --steps restarted the schedule mid-run (lr 0.0 at step 19 of 20, then 4.8e-4), exit 0."""
    from zoplan.planfile import zo_settings

    out = finished_run(tmp_path / "run", tiny_dirs["tiny-opt"])
    report = make_plan(
        str(tiny_dirs["tiny-opt"] / "config.json"),
        "cpu-local",
        global_batch=4,
        seq_len=32,
        dtype="fp32",
        zo=zo_settings(steps=6, lr_schedule="cosine"),
    )
    write_plan(report.plan, out / "plan.yaml")
    (out / "run.json").write_text(json.dumps({**json.loads((out / "run.json").read_text()), "version": 1, "steps": 6}))
    from zoplan.runtime.zo import learning_rate

    (out / "journal.jsonl").write_text("".join(line(s, lr=learning_rate(1e-6, "cosine", s, 6)) for s in range(6)))
    with pytest.raises(ZoplanError) as said:
        resume(out, 12)
    assert "--steps 12: the run in" in said.value.message
    assert "follows a cosine learning-rate schedule over 6 steps, and its 6 step(s) so far" in said.value.message
    assert "resume with --steps 6" in said.value.fix
    resume(out, 6)  # the same total: resumed


def test_a_resume_that_trains_on_moves_the_finished_weights_aside(run_dir: Path, capsys) -> None:
    """model/ held the weights of the step the run had finished at while the resumed run went on
    (interrupted, its journal and model/ told two stories); it is kept under its step."""
    (run_dir / "model").mkdir()
    (run_dir / "model" / "model.safetensors").write_bytes(b"the weights of step 6")
    resume(run_dir, 9)  # a constant schedule: any total
    assert not (run_dir / "model").exists()
    assert (run_dir / "model-step6" / "model.safetensors").read_bytes() == b"the weights of step 6"
    assert (
        f"{run_dir / 'model'} held the weights of step 6: moved to {run_dir / 'model-step6'}" in capsys.readouterr().err
    )


def test_a_resume_after_the_journal_was_cut_back_or_lost_says_what_the_run_holds(run_dir: Path, capsys) -> None:
    """A journal cut back (as a damaged line's fix advises) left model/ of the finished step moved
    to model-step<the journal's end>, and metrics.jsonl's rows of the cut steps gave the summary
    the old run's figures; a journal removed made a finished run one of no step: retrained from
    the base weights, its snapshots removed as past the journal's end, exit 0."""
    from zoplan.records import EvalRow, TrainRow

    (run_dir / "model").mkdir()
    (run_dir / "model" / "model.safetensors").write_bytes(b"the weights of step 6")
    (run_dir / ".finished-node0-rank0").write_text("6")  # what a finished run's ranks leave
    rows = [EvalRow(step=-1, eval_loss=7.0, eval_accuracy=0.5).line()]
    rows += [
        TrainRow(
            step=s, loss=7.0, projected_grad=1.0, step_time_s=0.1, tokens_per_s=1.0, elapsed_s=s, nonfinite_total=0
        ).line()
        for s in range(6)
    ]
    rows += [EvalRow(step=5, eval_loss=6.5, eval_accuracy=0.5).line()]
    (run_dir / "metrics.jsonl").write_text("".join(rows))
    journal = run_dir / "journal.jsonl"
    journal.unlink()
    with pytest.raises(ZoplanError) as refused:
        resume(run_dir, 9)
    assert f"{journal} is gone, but {run_dir} holds a model/ of its final weights and its ranks' marks of 6" in str(
        refused.value
    )
    assert f": > {journal}" in refused.value.fix and (run_dir / "model").is_dir()
    journal.write_text("".join(line(s) for s in range(4)))  # cut back to 4 steps
    resume(run_dir, 9)
    said = capsys.readouterr().err
    assert f"held the weights of step 6 (the journal now ends at step 4): moved to {run_dir / 'model-step6'}" in said
    assert (run_dir / "model-step6" / "model.safetensors").read_bytes() == b"the weights of step 6"
    assert "3 row(s) of" in said and "after the journal's end (step 4) removed" in said
    kept = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in kept] == [-1, 0, 1, 2, 3]
    journal.write_text("")  # emptied on purpose (the fix above): a run of no step, resumed
    resume(run_dir, 9)


def test_a_new_run_inside_another_run_s_directory_is_refused(run_dir: Path, tiny_dirs) -> None:
    """A run started with -o RUN/model finished with exit 0, and RUN's own finish then replaced
    its model/ with RUN's weights: the second run's journal, model and logs were gone."""
    for inside in (run_dir / "model", run_dir / "snapshots" / "mine"):
        with pytest.raises(ZoplanError, match=f"{inside} is inside {run_dir}, the output directory of another run"):
            prepare(make(model=str(tiny_dirs["tiny-opt"]), output=inside, steps=2))
        assert not inside.exists()


def test_replay_into_a_run_s_directory_is_refused_where_the_run_writes_or_while_it_trains(
    run_dir: Path, tiny_dirs
) -> None:
    """`zoplan replay RUN -o RUN/model` wrote the replayed weights where RUN's own finish (or a
    resume) removes or moves what it finds, exit 0; and into a run that is training, anywhere."""
    from fuzzkit import console

    from zoplan.runtime.scratch import run_lock

    base, journal_path = str(tiny_dirs["tiny-opt"]), run_dir / "journal.jsonl"
    for inside in (run_dir / "model", run_dir / "model-step3", run_dir / "snapshots" / "mine"):
        top = inside.relative_to(run_dir).parts[0]
        where = f"is {run_dir}'s own {top}/" if inside.name == top else f"is inside {run_dir}/{top}/"
        with pytest.raises(ZoplanError, match=f"{inside} {where}, which the run in"):
            replay_to(base, journal_path, inside)
        assert not inside.exists()
    with run_lock(run_dir, 0):  # the run trains
        with pytest.raises(
            ZoplanError, match=f"the output directory of a run that is training now \\(pid {os.getpid()}\\)"
        ):
            replay_to(base, journal_path, run_dir / "replayed")
        assert not (run_dir / "replayed").exists()
        # outside it, the steps journaled so far, said as such
        code, said = console(["replay", base, str(journal_path), "-o", str(run_dir.parent / "now")], limit=120)
        assert code == 0 and f"the run in {run_dir} is training (pid {os.getpid()})" in said, said
        assert "its weights after the 6 steps its journal held" in said
    # a finished run's directory holds a replay beside the run's own files, under any other name
    assert replay_to(base, journal_path, run_dir / "models") == 6
    assert replay_to(base, journal_path, run_dir / "replayed") == 6


def test_a_damaged_run_record_is_refused(run_dir: Path) -> None:
    (run_dir / "run.json").write_text('{"model": 3')
    with pytest.raises(ZoplanError, match="run.json is damaged"):
        resume(run_dir, 9)


def test_replay_refuses_a_journal_without_its_first_steps(tiny_dirs, tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_text("".join(line(s) for s in range(2, 5)))
    assert [r["step"] for r in read_journal(path)] == [2, 3, 4]  # a consecutive excerpt reads
    with pytest.raises(ZoplanError, match="the first line is step 2, expected step 0"):
        replay_to(str(tiny_dirs["tiny-opt"]), path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_replay_writes_no_weights_that_are_not_finite(tiny_dirs, tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_text(line(0, projected_grad=1e300))  # a finite number whose update overflows fp32
    with_plan(path, tiny_dirs["tiny-opt"])
    with pytest.raises(ZoplanError, match="not finite"):
        replay_to(str(tiny_dirs["tiny-opt"]), path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_require_finite_names_the_first_bad_tensor() -> None:
    good, bad = torch.ones(3), torch.tensor([1.0, float("nan")])
    require_finite([("a", good), ("ids", torch.arange(3))], "w", "fix")
    with pytest.raises(ZoplanError, match="'b' holds values that are not finite"):
        require_finite([("a", good), ("b", bad), ("c", bad)], "w", "fix")


def test_a_run_whose_weights_overflow_writes_no_model(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "zoplan.cli", "run", "--steps", "2", "--lr", "1e38", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    # (the second step's losses, at the overflowed weights, are not finite either: the run's end
    # says so before the weights' own check would)
    said = proc.stderr
    assert "not finite" in said and ("nothing was written" in said or "no model/ is written" in said), said
    assert not (out / "model").exists() and not (out / "model.tmp").exists()


META_DAMAGE = {
    "too large": '{"step": 5, "pad": "' + "x" * (1 << 17) + '"}',
    "nested past recursion": "[" * 100_000 + "]" * 100_000,
    "not an object": "[5]",
    "another step": '{"step": 4}',
    "a fractional step": '{"step": 5.5}',
    "a boolean step": '{"step": true}',
    "not json": '{"step": 5',
}


def _cut_weights(folder: Path) -> None:  # a disk that filled up while it was copied elsewhere, say
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


# how the newest snapshot is damaged: its weights cut short, or its meta.json (META_DAMAGE)
SNAPSHOT_DAMAGE = {
    "truncated weights": _cut_weights,
    "no meta.json": lambda f: (f / "meta.json").unlink(),  # (it was left out without a word)
    **{f"meta.json {k}": (lambda f, t=t: (f / "meta.json").write_text(t)) for k, t in META_DAMAGE.items()},
}


@pytest.mark.parametrize("name", sorted(SNAPSHOT_DAMAGE))
def test_a_damaged_snapshot_is_left_out_and_named(run_dir: Path, capsys, name: str) -> None:
    from safetensors.torch import save_file

    from zoplan.runtime.snapshots import resume_point, snapshot_dir

    for step in (3, 5):
        folder = snapshot_dir(run_dir, step)
        folder.mkdir(parents=True)
        save_file({"w": torch.ones(64)}, str(folder / "model.safetensors"))
        (folder / "meta.json").write_text(json.dumps({"step": step}))
    SNAPSHOT_DAMAGE[name](snapshot_dir(run_dir, 5))
    point = resume_point(run_dir)
    assert point.base == snapshot_dir(run_dir, 3) and [r["step"] for r in point.replay] == [3, 4, 5]
    said = capsys.readouterr().err
    assert "snapshot step-00000005 left out" in said and "copy the checkpoint again" not in said, said
    resume(run_dir, 9)  # the launcher names it too, and goes on
    assert "step-00000005 left out" in capsys.readouterr().err


def _flip_a_bit(path: Path) -> None:
    """One bit of a tensor's data flipped in place: the size and the header stay as they were."""
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("weights", ["model.safetensors", "adapter_model.safetensors"])
def test_a_snapshot_whose_weights_changed_since_written_is_moved_aside_and_the_run_resumes_before_it(
    run_dir: Path, capsys, weights: str
) -> None:
    """A flipped bit keeps a safetensors file's size and header: the snapshot loaded without a
    word, and the run went on from other weights than it had (exit 0). meta.json holds the
    CRC-32 of the weights as written; the launcher checks the one a resume would load."""
    from safetensors.torch import save_file

    from zoplan.runtime.snapshots import resume_point, snapshot_dir, write_snapshot

    for step in (3, 5):
        write_snapshot(run_dir, step, lambda d: save_file({"w": torch.arange(64.0)}, str(d / weights)), keep=0)
    meta = json.loads((snapshot_dir(run_dir, 5) / "meta.json").read_text())
    assert meta["step"] == 5 and set(meta["crc32"]) == {weights}, meta
    resume(run_dir, 9)  # intact: nothing said, nothing moved
    assert "left out" not in capsys.readouterr().err and snapshot_dir(run_dir, 5).is_dir()
    _flip_a_bit(snapshot_dir(run_dir, 5) / weights)
    resume(run_dir, 9)
    said = capsys.readouterr().err
    aside = run_dir / "snapshots" / "damaged-step-00000005"
    assert f"snapshot step-00000005 left out and moved to {aside}: its {weights} is not what was written" in said, said
    assert aside.is_dir() and not snapshot_dir(run_dir, 5).exists()
    point = resume_point(run_dir)  # what the ranks then load: the snapshot before it, and the journal after
    assert point.base == snapshot_dir(run_dir, 3) and [r["step"] for r in point.replay] == [3, 4, 5]
    _flip_a_bit(snapshot_dir(run_dir, 3) / weights)  # and when every one changed: the base weights
    resume(run_dir, 9)
    assert "step-00000003 left out" in capsys.readouterr().err
    assert resume_point(run_dir).base is None


def test_a_snapshot_meta_json_with_a_damaged_crc_record_is_left_out(run_dir: Path, capsys) -> None:
    from safetensors.torch import save_file

    from zoplan.runtime.snapshots import snapshots, snapshot_dir

    for crcs in ({"model.safetensors": "12"}, {"other.bin": 1}, {"model.safetensors": -1}, [1]):
        folder = snapshot_dir(run_dir, 4)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.ones(4)}, str(folder / "model.safetensors"))
        (folder / "meta.json").write_text(json.dumps({"step": 4, "crc32": crcs}))
        assert snapshots(run_dir, check=True) == [], crcs
        assert "step-00000004 left out: its meta.json is damaged" in capsys.readouterr().err


CHECKPOINT_DAMAGE = {
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "holds no weights"),
    "truncated weights": (
        lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
        "model.safetensors is truncated or damaged",
    ),
    "no tokenizer": (lambda d: [p.unlink() for p in d.glob("tokenizer*")], "has no tokenizer"),
    "fewer layers in the config": (
        lambda d: _edit_config(d, num_hidden_layers=1),
        "config.json says 1 layer(s), the weights hold 4",
    ),
    "a wider config": (
        lambda d: _edit_config(d, hidden_size=128, word_embed_proj_dim=128),
        "tensor shape(s) differ (model.decoder.embed_tokens.weight is [1405, 64] in the weights",
    ),
    # (the loader rank kept the head apart, the others tied it: two models, every step wrong, exit 0)
    "a tied config over weights with a head of their own": (
        lambda d: _add_head(d, shift=1.0),
        "config.json ties the head to the embedding (tie_word_embeddings: true), but the weights hold their own",
    ),
}


def _add_head(model_dir: Path, shift: float) -> None:
    """The checkpoint's head saved beside its embedding: ``shift`` added to its values."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    tensors["lm_head.weight"] = tensors["model.decoder.embed_tokens.weight"].clone() + shift
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_a_tied_checkpoint_that_saved_its_head_too_passes(tiny_dirs, tmp_path: Path) -> None:
    import shutil

    from zoplan.runtime.checkpoint import check_model_dir

    model = tmp_path / "model"
    shutil.copytree(tiny_dirs["tiny-opt"], model)
    _add_head(model, shift=0.0)  # the same values as the embedding: tied
    check_model_dir(model)


def _edit_config(model_dir: Path, **fields) -> None:
    path = model_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize("name", sorted(CHECKPOINT_DAMAGE))
def test_a_damaged_model_directory_is_refused_before_any_rank_starts(tiny_dirs, tmp_path: Path, name: str) -> None:
    import shutil

    from zoplan.runtime.checkpoint import check_model_dir

    model = tmp_path / "model"
    shutil.copytree(tiny_dirs["tiny-opt"], model)
    check_model_dir(model)  # whole, it passes
    damage, words = CHECKPOINT_DAMAGE[name]
    damage(model)
    with pytest.raises(ZoplanError) as caught:
        check_model_dir(model)
    assert words in str(caught.value) and caught.value.fix
    out = tmp_path / "run"
    with pytest.raises(ZoplanError, match=words.split(" (")[0].replace("(", r"\(").replace(")", r"\)")):
        prepare(make(model=str(model), output=out, steps=2))
    assert not out.exists()


def _as_bin(model_dir: Path, shards: int = 1) -> Path:
    """The checkpoint saved again in torch's pickled format (pytorch_model.bin, or ``shards``
    files and their index, as older checkpoints are), its safetensors file removed."""
    from safetensors.torch import load_file

    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    path.unlink()
    if shards == 1:
        torch.save(tensors, model_dir / "pytorch_model.bin")
        return model_dir / "pytorch_model.bin"
    names = sorted(tensors)
    weight_map = {}
    for k in range(shards):
        shard = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: tensors[n] for n in names[k::shards]}, model_dir / shard)
        weight_map.update((n, shard) for n in names[k::shards])
    (model_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return model_dir / f"pytorch_model-00001-of-{shards:05d}.bin"


def _add_bin_head(path: Path, shift: float) -> None:
    tensors = torch.load(path, weights_only=True)
    tensors["lm_head.weight"] = tensors["model.decoder.embed_tokens.weight"].clone() + shift
    torch.save(tensors, path)


BIN_DAMAGE = {
    "truncated weights": (lambda d, f: f.write_bytes(f.read_bytes()[:5000]), "is truncated or damaged"),
    "fewer layers in the config": (
        lambda d, f: _edit_config(d, num_hidden_layers=1),
        "config.json says 1 layer(s), the weights hold 4",
    ),
    "a wider config": (
        lambda d, f: _edit_config(d, hidden_size=128, word_embed_proj_dim=128),
        "tensor shape(s) differ (model.decoder.embed_tokens.weight is [1405, 64] in the weights",
    ),
    "a tied config over weights with a head of their own": (
        lambda d, f: _add_bin_head(d / "pytorch_model.bin", shift=1.0),
        "config.json ties the head to the embedding (tie_word_embeddings: true), but the weights hold their own",
    ),
    "a shard its index names is missing": (
        lambda d, f: f.unlink(),
        "lacks 1 weight shard(s) its index names (first: pytorch_model-00001-of-00002.bin)",
    ),
}


@pytest.mark.parametrize("name", sorted(BIN_DAMAGE))
def test_a_pytorch_model_bin_checkpoint_is_checked_as_a_safetensors_one(tiny_dirs, tmp_path: Path, name: str) -> None:
    """Weights in torch's pickled format (pytorch_model.bin, sharded or not) were not compared
    with config.json: a config of fewer layers trained a truncated model, a wider one started
    from random weights, a head of its own under a tied config ran two models, exit 0. Their
    shapes are read from the pickle on the meta device (the data not read) and checked alike."""
    import shutil

    from zoplan.runtime.checkpoint import check_model_dir

    model = tmp_path / "model"
    shutil.copytree(tiny_dirs["tiny-opt"], model)
    shards = 2 if "shard" in name else 1
    first = _as_bin(model, shards)
    check_model_dir(model)  # whole, it passes
    if "head" in name:
        _add_bin_head(first, shift=0.0)  # a head with the embedding's values: tied, it passes
        check_model_dir(model)
    damage, words = BIN_DAMAGE[name]
    damage(model, first)
    with pytest.raises(ZoplanError) as caught:
        check_model_dir(model)
    assert words in str(caught.value) and caught.value.fix, str(caught.value)


@pytest.mark.parametrize("name", sorted(CHECKPOINT_DAMAGE))
def test_replay_refuses_a_damaged_model_directory_as_run_does(tiny_dirs, tmp_path: Path, name: str) -> None:
    """`zoplan replay` onto base weights `zoplan run` would refuse: the same message (exit 2, a
    fix, no traceback: a truncated model.safetensors was safetensors' own error), nothing written."""
    import shutil

    from fuzzkit import console

    model = tmp_path / "model"
    shutil.copytree(tiny_dirs["tiny-opt"], model)
    (tmp_path / "run").mkdir()
    path = with_plan(tmp_path / "run" / "journal.jsonl", tiny_dirs["tiny-opt"])
    path.write_text(journal(2))
    damage, words = CHECKPOINT_DAMAGE[name]
    damage(model)
    code, said = console(["replay", str(model), str(path), "-o", str(tmp_path / "out")], limit=120)
    assert code == 2 and words in said and "fix:" in said and "Traceback" not in said, said
    assert not (tmp_path / "out").exists()


def test_replay_refuses_a_journal_without_the_plan_of_its_run(tiny_dirs, tmp_path: Path) -> None:
    """The journal's lines do not say what the run trained (every weight, a LoRA or a prefix
    adapter) nor its dtypes: without plan.yaml beside it a LoRA, prefix or bf16 run's journal
    was replayed as a full fp32 run, exit 0. Refused, with the way to replay it; with the plan
    beside, the same journal replays."""
    from fuzzkit import console

    path = tmp_path / "lone" / "journal.jsonl"
    path.parent.mkdir()
    path.write_text(journal(2))
    with pytest.raises(ZoplanError) as caught:
        replay_to(str(tiny_dirs["tiny-opt"]), path, tmp_path / "out")
    assert "has no plan.yaml beside it" in caught.value.message and "LoRA" in caught.value.message
    assert "put the run's plan.yaml next to the journal" in (caught.value.fix or "")
    assert not (tmp_path / "out").exists()
    code, said = console(["replay", str(tiny_dirs["tiny-opt"]), str(path), "-o", str(tmp_path / "out")], limit=120)
    assert code == 2 and said.startswith("error: ") and "plan.yaml" in said and "Traceback" not in said, said
    assert not (tmp_path / "out").exists()
    with_plan(path, tiny_dirs["tiny-opt"])
    assert replay_to(str(tiny_dirs["tiny-opt"]), path, tmp_path / "out") == 2


@pytest.fixture(scope="module")
def resumable(tiny_dirs, tmp_path_factory) -> Path:
    """One run directory (plan, run.json, journal) the fuzz examples copy and mutate."""
    return finished_run(tmp_path_factory.mktemp("resumable") / "run", tiny_dirs["tiny-opt"])


RESUMES: dict[str, int] = {}


@fuzz_settings(50)
@given(data=st.data())
def test_resume_of_a_mutated_run_directory_is_refused_with_a_message_or_checked(
    resumable: Path, tmp_path_factory, data
) -> None:
    """--resume with the journal, run.json or plan.yaml mutated byte by byte: the launcher either
    refuses with one message (before any rank starts) or accepts a journal that reads whole."""
    import shutil

    out = tmp_path_factory.mktemp("mutated") / "run"
    shutil.copytree(resumable, out)
    name = data.draw(st.sampled_from(["journal.jsonl", "journal.jsonl", "run.json", "plan.yaml"]), label="file")
    raw = (out / name).read_bytes()
    (out / name).write_bytes(
        mutate_bytes(
            data,
            raw,
            [b"NaN", b"Infinity", b"1e999", b'"x"', b"-1", b"\n", b"{", b"}"],
            (
                "truncate",
                "insert",
                "overwrite",
                "delete_span",
                "dup_line",
                "drop_line",
                "swap_lines",
                "blank_line",
                "crlf",
                "latin1",
            ),
        )
    )
    try:
        resume(out, 9)
        rows = read_valid_journal(out / "journal.jsonl")  # accepted: what the ranks will read is whole
        assert [r["step"] for r in rows] == list(range(len(rows)))
        RESUMES["accepted"] = RESUMES.get("accepted", 0) + 1
    except ZoplanError as exc:
        assert exc.status == 2 and str(exc) and len(str(exc)) < 4096
        RESUMES["refused"] = RESUMES.get("refused", 0) + 1


def test_the_resume_fuzz_saw_both_outcomes() -> None:
    if not RESUMES:
        pytest.skip("run with the fuzz test above")
    assert RESUMES.get("accepted", 0) >= 3 and RESUMES.get("refused", 0) >= 10, RESUMES
    print(f"mutated run directories resumed: {RESUMES}")


def test_a_full_disk_at_the_final_write_leaves_no_half_model_and_says_how_to_finish(
    tmp_path: Path, monkeypatch
) -> None:
    import errno

    from zoplan.runtime import worker

    def full(host, engine, model_dir, target, dtype):
        target.mkdir(parents=True)
        (target / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(worker, "write_weights", full)
    with pytest.raises(ZoplanError) as caught:
        worker.save_final(None, None, tmp_path, tmp_path, "fp32", 12)
    assert "No space left on device; the journal holds all 12 step(s)" in str(caught.value)
    assert f"zoplan run --resume {tmp_path} --steps 12" in caught.value.fix
    assert not (tmp_path / "model.tmp").exists() and not (tmp_path / "model").exists()


@pytest.mark.parametrize("given_empty", [False, True])
def test_a_full_disk_while_replay_writes_leaves_nothing_half_written(
    tiny_dirs, tmp_path: Path, monkeypatch, given_empty: bool
) -> None:
    import errno

    from transformers import PreTrainedModel

    def full(self, target, **kwargs):
        (Path(target) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    path = with_plan(tmp_path / "journal.jsonl", tiny_dirs["tiny-opt"])
    path.write_text(journal(2))
    out = tmp_path / "out"
    if given_empty:
        out.mkdir()
    with pytest.raises(ZoplanError, match="writing the replayed weights into .* failed: No space left on device"):
        replay_to(str(tiny_dirs["tiny-opt"]), path, out)
    assert (out.is_dir() and not any(out.iterdir())) if given_empty else not out.exists()


def test_a_model_directory_that_passed_is_not_checked_again_until_a_file_changes(
    tiny_dirs, tmp_path: Path, monkeypatch
) -> None:
    import shutil

    from zoplan.runtime import checkpoint

    monkeypatch.setattr(checkpoint, "checked_cache_dir", lambda: tmp_path / "checked")
    model = tmp_path / "model"
    shutil.copytree(tiny_dirs["tiny-opt"], model)
    calls = []
    real = checkpoint._check_model_dir
    monkeypatch.setattr(checkpoint, "_check_model_dir", lambda d: (calls.append(d), real(d)))
    checkpoint.check_model_dir(model)
    checkpoint.check_model_dir(model)
    assert len(calls) == 1 and len(list((tmp_path / "checked").iterdir())) == 1
    # any change to a file (here: the same bytes written again, so only the time moves) checks again
    (model / "config.json").write_bytes((model / "config.json").read_bytes())
    checkpoint.check_model_dir(model)
    assert len(calls) == 2
    # and a damage found then is refused, however often the directory passed before
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(ZoplanError, match="truncated or damaged"):
        checkpoint.check_model_dir(model)
    with pytest.raises(ZoplanError, match="truncated or damaged"):
        checkpoint.check_model_dir(model)
    assert len(calls) == 4


def test_the_run_record_holds_absolute_paths_so_resume_works_from_anywhere(
    tiny_dirs, tmp_path: Path, monkeypatch
) -> None:
    import shutil

    shutil.copytree(tiny_dirs["tiny-opt"], tmp_path / "models" / "mine")
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps({"text": f"text {i}", "label": i % 2}) + "\n" for i in range(16))
    )
    monkeypatch.chdir(tmp_path)
    prepare(make(model="models/mine", data="train.jsonl", output=Path("run"), steps=2, global_batch=4))
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (recorded["model"], recorded["data"]) == (str(tmp_path / "models" / "mine"), str(tmp_path / "train.jsonl"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = prepare(resume_config(tmp_path / "run", {"steps": 4})[0], resume=True)[0]
    # from another directory the recorded model and data are found
    assert (cfg.model, cfg.data, cfg.steps) == (recorded["model"], recorded["data"], 4)
    # names are kept as names (a built-in model, bundled data)
    monkeypatch.chdir(tmp_path)
    prepare(make(model="tiny-opt", data="sentiment", output=Path("run2"), steps=2))
    recorded = json.loads((tmp_path / "run2" / "run.json").read_text())
    assert (recorded["model"], recorded["data"]) == ("tiny-opt", "sentiment")


def test_a_built_in_name_is_recorded_as_a_name_where_a_folder_of_that_name_stands(
    tiny_dirs, tmp_path: Path, monkeypatch, capsys
) -> None:
    """``--model tiny-opt`` trains the built-in model even where ./tiny-opt is a checkpoint of its
    own; run.json named the folder, so the finished run could never be resumed or replayed (its
    weights were not the ones the run started from). Said, and recorded as the name."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_dirs["tiny-opt"], tmp_path / "tiny-opt")
    (tmp_path / "sentiment").mkdir()  # (a folder named like the bundled data)
    prepare(make(model="tiny-opt", data="sentiment", eval_data="sentiment", output=Path("run"), steps=2))
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (recorded["model"], recorded["data"], recorded["eval_data"]) == ("tiny-opt", "sentiment", "sentiment")
    said = capsys.readouterr().err
    assert f"--model tiny-opt is zoplan's built-in model of that name: {tmp_path / 'tiny-opt'} is not read" in said
    assert "--model ./tiny-opt trains it" in said
    cfg = prepare(resume_config(tmp_path / "run", {"steps": 4})[0], resume=True)[0]
    assert (cfg.model, cfg.data) == ("tiny-opt", "sentiment")
    # the folder, named as a path, is the folder (and no word about the built-in)
    prepare(make(model="./tiny-opt", data="sentiment", output=Path("run2"), steps=2))
    assert json.loads((tmp_path / "run2" / "run.json").read_text())["model"] == str(tmp_path / "tiny-opt")
    assert "built-in" not in capsys.readouterr().err


def test_a_prompt_that_ends_in_a_space_is_said(tmp_path: Path, monkeypatch, capsys) -> None:
    """Each label word is read after a space of its own: "{text} It was " made the model read two
    spaces before " great", exit 0 and not a word (a recipe's prompt ending in a newline is no such case)."""
    monkeypatch.chdir(tmp_path)
    prepare(make(model="tiny-opt", data="sentiment", prompt="{text} It was ", output=Path("run"), steps=2))
    said = capsys.readouterr().err
    assert "--prompt '{text} It was ' ends in a space" in said and "(--prompt '{text} It was' reads one)" in said
    prepare(make(model="tiny-opt", data="sentiment", prompt="{text} It was", output=Path("run2"), steps=2))
    prepare(make(model="tiny-opt", data="sentiment", prompt="{text}\nAnswer:\n", output=Path("run3"), steps=2))
    assert "ends in a space" not in capsys.readouterr().err


def test_a_model_or_data_given_with_resume_is_named_as_ignored(run_dir: Path) -> None:
    from fuzzkit import console

    code, output = console(["run", "--resume", str(run_dir), "--model", "/elsewhere/model", "--steps", "4"])
    assert code == 2 and "fewer than the 6 step(s)" in output  # (refused: no rank starts in this test)
    assert "warning: --model ignored: the run in" in output and "run.json" in output


def test_written_weights_take_the_umask_and_the_chat_template_travels(tiny_dirs, tmp_path: Path) -> None:
    """safetensors writes 0600 whatever the umask; zoplan's model directories are as readable as
    any file the user writes. The files copied beside trained weights include the chat template."""
    from zoplan.runtime.checkpoint import companion_files

    path = with_plan(tmp_path / "journal.jsonl", tiny_dirs["tiny-opt"])
    path.write_text(journal(2))
    before = os.umask(0o022)
    try:
        replay_to(str(tiny_dirs["tiny-opt"]), path, tmp_path / "out")
    finally:
        os.umask(before)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "out").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
    base = tmp_path / "base"
    base.mkdir()
    for name in (
        "config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "model.safetensors",
        "model.safetensors.index.json",
        "notes.md",
    ):
        (base / name).write_text("{}")
    assert [f.name for f in companion_files(base)] == ["chat_template.jinja", "config.json", "tokenizer.json"]


def test_replay_refuses_other_base_weights_than_the_run_started_from(tiny_dirs, tmp_path: Path) -> None:
    """The run's run.json records a fingerprint of its starting weights: a journal replayed onto a
    checkpoint of the same shape but other values is refused; onto the same weights at another
    path (a copy), it replays."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_dirs["tiny-opt"], model)
    out = tmp_path / "run"
    prepare(make(model=str(model), output=out, steps=2))  # plan.yaml and run.json, as a run writes them
    (out / "journal.jsonl").write_text(journal(2))
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    assert replay_to(str(copy), out / "journal.jsonl", tmp_path / "same") == 2
    tensors = load_file(str(model / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * 2
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ZoplanError, match="are not the ones the run in"):
        replay_to(str(model), out / "journal.jsonl", tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_a_held_out_part_that_leaves_less_than_a_batch_is_refused_and_an_overlap_is_said(
    tiny_dirs, tmp_path: Path
) -> None:
    """--eval-fraction 0.95 of 40 examples left 2 to train on: every batch of 4 repeated them, exit
    0 (the same 2 examples as --data were refused). --eval-data equal to --data, or records
    repeated in --data, evaluated on training examples and called it held out, without a word."""
    from zoplan.runtime.launch import warnings_to

    data = tmp_path / "train.jsonl"
    records = [json.dumps({"text": f"text {i}", "label": i % 2}) for i in range(40)]
    data.write_text("\n".join(records) + "\n")
    model = str(tiny_dirs["tiny-opt"])

    def start(name: str, **given) -> list[str]:
        said: list[str] = []
        with warnings_to(said.append):
            prepare(make(model=model, data=str(data), output=tmp_path / name, steps=2, global_batch=4, **given))
        return said

    with pytest.raises(ZoplanError) as refused:
        start("most-held-out", eval_fraction=0.95)
    assert "--eval-fraction 0.95 holds out 38 of the 40 examples" in refused.value.message
    assert "leaves 2 to train on, fewer than one global batch of 4" in refused.value.message
    assert "at most 0.9 keeps a batch" in refused.value.fix
    assert not (tmp_path / "most-held-out").exists()
    assert start("fine", eval_fraction=0.9) == []  # 4 left: one batch
    said = start("same", eval_data=str(data))
    assert said == [
        f"40 of the 40 held-out example(s) are also training examples (the same record in --data and --eval-data "
        f"{data}): the held-out loss and accuracy are not measured on unseen examples alone"
    ]
    data.write_text("\n".join(records * 3) + "\n")  # each record three times: the split holds out copies
    said = start("repeated")
    assert len(said) == 1 and said[0].startswith("12 of the 12 held-out example(s) are also training examples")
    assert f"more than once in {data}" in said[0]


def test_a_stop_before_the_ranks_start_keeps_nothing_of_a_new_run_and_leaves_a_resume_as_it_was(
    tiny_dirs, run_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """SIGTERM after the launcher had written run.json and plan.yaml, before its handler of stop
    signals was in place, killed it (status -15) and left them: the same command was then refused
    as "not empty". The handler is in place from the start of a run."""
    import os
    import signal

    from zoplan.errors import Refused
    from zoplan.runtime import launch

    real = launch.prepare

    def stopped_there(cfg, resume=False):
        made = real(cfg, resume)
        os.kill(os.getpid(), signal.SIGTERM)  # as a job scheduler's, once run.json is written
        return made

    monkeypatch.setattr(launch, "prepare", stopped_there)
    out = tmp_path / "new"
    with pytest.raises(launch.NothingDone) as stopped:
        launch.run(make(model=str(tiny_dirs["tiny-opt"]), output=out, steps=2))
    assert stopped.value.status == 128 + signal.SIGTERM and not out.exists()
    assert "stopped by SIGTERM before the first step; nothing was trained" in stopped.value.message
    record = (run_dir / "run.json").read_bytes()
    with pytest.raises(Refused) as stopped:
        launch.run(resume_config(run_dir, {"steps": 9})[0], resume=True)
    assert stopped.value.status == 128 + signal.SIGTERM and "the run in" in stopped.value.message
    assert f"zoplan run --resume {run_dir} --steps 9" in stopped.value.fix
    assert (run_dir / "run.json").read_bytes() == record  # (the resume had written its options there)


@pytest.mark.parametrize("fails", ["plan.yaml", "run.json"])
def test_a_new_run_whose_first_files_do_not_fit_on_the_disk_leaves_nothing_and_says_so(
    tmp_path: Path, tiny_dirs, monkeypatch, fails: str
) -> None:
    """A full disk while a new run wrote run.json ended in an OSError traceback (exit 1), and a
    disk full at plan.yaml left an empty plan.yaml: either way the directory refused the same
    command ("not empty") and a resume ("holds no run"). Now the run is refused with the disk's
    state, and what it wrote goes."""
    import errno

    from zoplan import fileio
    from zoplan.runtime import launch

    real = fileio.Path.replace

    def full(self, target):
        if Path(target).name == fails:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, target)

    monkeypatch.setattr(fileio.Path, "replace", full)
    given = tmp_path / "given"
    given.mkdir()
    for out in (tmp_path / "new", given):
        with pytest.raises(launch.NothingDone) as refused:
            launch.run(make(model=str(tiny_dirs["tiny-opt"]), output=out, steps=2))
        assert f"cannot write {out / fails}: No space left on device" in refused.value.message
        assert "free space on the disk" in refused.value.fix and "run the same command again" in refused.value.fix
        left = [p.name for p in out.iterdir()] if out.exists() else []
        assert all(name.startswith(".lock-node") for name in left), left
    assert not (tmp_path / "new").exists() and given.is_dir()  # a folder given stays, empty
    monkeypatch.undo()
    launch.prepare(make(model=str(tiny_dirs["tiny-opt"]), output=given, steps=2))  # the same command again
    assert (given / "run.json").is_file() and (given / "plan.yaml").is_file()


def test_a_file_written_whole_or_not_at_all(tmp_path: Path, monkeypatch) -> None:
    """A profile calibrated again onto a full disk was written in place: the good one before it
    was lost. Now it is written beside and moved over: a failure keeps the earlier file."""
    import errno

    from zoplan import fileio

    path = tmp_path / "profile.yaml"
    fileio.write_yaml(path, {"a": 1})
    real = fileio.Path.write_text

    def full(self, text, **kw):
        real(self, text[:3], **kw)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.Path, "write_text", full)
    with pytest.raises(ZoplanError, match="No space left on device") as refused:
        fileio.write_yaml(path, {"a": 2})
    assert "free space on the disk" in refused.value.fix
    assert path.read_text() == "{a: 1}\n" and [p.name for p in tmp_path.iterdir()] == ["profile.yaml"]
    monkeypatch.undo()
    longest = tmp_path / ("p" * 250 + ".yaml")  # (a temporary name made from it was too long)
    fileio.write_yaml(longest, {"a": 3})
    assert longest.read_text() == "{a: 3}\n" and len(list(tmp_path.iterdir())) == 2


def test_a_replay_of_an_empty_journal_says_the_model_is_the_base(
    tiny_dirs, tmp_path: Path, capsys, monkeypatch
) -> None:
    """An emptied journal (or a run stopped before its first step) replayed 0 steps, exit 0, and
    nothing said that the model written is the base, unchanged."""
    from zoplan.cli import main

    path = with_plan(tmp_path / "journal.jsonl", tiny_dirs["tiny-opt"])
    path.write_text("")
    monkeypatch.setattr(
        "sys.argv", ["zoplan", "replay", str(tiny_dirs["tiny-opt"]), str(path), "-o", str(tmp_path / "out")]
    )
    try:
        main()
    except SystemExit as ended:
        assert ended.code in (0, None)
    err = capsys.readouterr().err
    assert "holds no step" in err and "unchanged" in err, err


@pytest.mark.parametrize(
    "edit",
    [
        lambda text: text.replace("lr: 0.001", "lr: 0.1"),  # a setting changed mid-run
        lambda text: text.replace("wire_dtype: fp32", "wire_dtype: bf16").replace(
            "param_dtype: fp32", "param_dtype: bf16"
        ),
        lambda text: text + "\n",  # any edit, however small
    ],
)
def test_a_run_s_plan_edited_since_it_started_is_refused_on_resume_and_replay(tmp_path: Path, edit) -> None:
    """--resume and replay take the run's settings from the plan.yaml in its directory: an edited
    copy (a full run's plan swapped for a LoRA one, another lr, bf16 for fp32) went on as another
    run, or replayed the journal into other weights, exit 0."""
    from zoplan.runtime.launch import run

    out = tmp_path / "run"
    run(make(steps=2, lr=1e-3, global_batch=4, seq_len=16, output=out, quiet=True))
    assert json.loads((out / "run.json").read_text())["plan_stamp"].startswith("sha256:")
    original = (out / "plan.yaml").read_text()
    (out / "plan.yaml").write_text(edit(original))
    assert (out / "plan.yaml").read_text() != original
    with pytest.raises(ZoplanError, match="is not the plan the run in .* started with") as said:
        resume(out, 3)
    assert "put back the plan" in said.value.fix
    with pytest.raises(ZoplanError, match="is not the plan the run in"):
        replay_to("tiny-opt", out / "journal.jsonl", tmp_path / "replayed")
    assert not (tmp_path / "replayed").exists()
    (out / "plan.yaml").write_text(original)  # put back: resumed
    resume(out, 3)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_a_journal_that_is_a_named_pipe_is_refused_not_waited_on(run_dir: Path, tiny_dirs, tmp_path: Path) -> None:
    """A run directory whose journal is a named pipe: --resume hung for ever (its appends wait for
    a reader; SIGTERM did not end it), replay read it as empty and wrote the base model, exit 0."""
    path = run_dir / "journal.jsonl"
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(ZoplanError, match="is not a regular file"):
        resume(run_dir, 6)
    with pytest.raises(ZoplanError, match="is not a regular file"):
        replay_to(str(tiny_dirs["tiny-opt"]), path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_run_json_that_names_only_the_model_and_data_takes_the_plan_s_settings(run_dir: Path) -> None:
    """The fix for a damaged run.json is {"model": ..., "data": ...}: the resumed run trained as its
    plan.yaml says (4 sequences of 32 tokens), but its run.json recorded the defaults (8 of 64)."""
    from zoplan import runconfig
    from zoplan.planfile import load_plan

    plan = load_plan(run_dir / "plan.yaml")
    recorded = runconfig.read(run_dir / "run.json")
    assert (recorded.global_batch, recorded.seq_len) == (plan.batch.global_batch, plan.batch.seq_len) == (4, 32)
    assert (recorded.lr, recorded.eps, recorded.seed, recorded.steps) == (
        plan.zo.lr,
        plan.zo.eps,
        plan.zo.seed,
        plan.zo.steps,
    )


def test_a_model_trained_from_a_bf16_checkpoint_says_the_dtype_its_weights_are_in(tiny_dirs, tmp_path: Path) -> None:
    """The trained weights are written in the run's dtype (fp32 on CPU ranks) with the base's
    config.json beside them: it still said "bfloat16", so from_pretrained without a dtype loaded
    the trained model in bf16 and rounded the run's updates away."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from zoplan.runtime import fine_tune

    base = tmp_path / "bf16"
    shutil.copytree(tiny_dirs["tiny-llama"], base)
    state = load_file(str(base / "model.safetensors"))
    save_file({n: t.to(torch.bfloat16) for n, t in state.items()}, str(base / "model.safetensors"), {"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["dtype"]
    (base / "config.json").write_text(json.dumps({**config, **{k: "bfloat16" for k in keys}}))
    run = fine_tune(model=str(base), steps=2, output=str(tmp_path / "run"), quiet=True, lr=1e-3)
    saved = json.loads((run.model / "config.json").read_text())
    assert all(saved[k] == "float32" for k in keys), saved
    weights = load_file(str(run.model / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    model = AutoModelForCausalLM.from_pretrained(run.model)  # no dtype: what its config says
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    loaded = dict(model.named_parameters())
    assert any(
        torch.equal(loaded[n], weights[n]) and not torch.equal(weights[n], weights[n].bfloat16().float())
        for n in weights
        if n in loaded
    )  # an update bf16 would round away, kept


def test_weights_are_written_one_tensor_at_a_time_in_safetensors_own_format(tmp_path: Path) -> None:
    """write_safetensors makes each tensor as it writes it (save_file held the bytes of every
    tensor at once, on top of a copy of every weight: the model's size twice more in host memory
    at every snapshot and at the end). Its file reads back as save_file's does, to the bit, with
    the same metadata; each tensor is made once, in the header's order."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from zoplan.runtime.checkpoint import write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(3, 5, generator=g),
        "h": torch.randn(7, generator=g, dtype=torch.float64).to(torch.bfloat16),
        "f16": torch.randn(2, 2, generator=g).half(),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
        "ids": torch.arange(6, dtype=torch.int64).view(2, 3).t(),  # (not contiguous)
    }
    made: list[str] = []

    def maker(name: str):
        def make() -> torch.Tensor:
            made.append(name)
            return tensors[name]

        return make

    write_safetensors(
        tmp_path / "mine.safetensors",
        {n: (t.dtype, tuple(t.shape), maker(n)) for n, t in tensors.items()},
        metadata={"format": "pt"},
    )
    assert made == list(tensors)
    save_file(
        {n: t.contiguous() for n, t in tensors.items()}, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"}
    )
    mine, theirs = load_file(str(tmp_path / "mine.safetensors")), load_file(str(tmp_path / "theirs.safetensors"))
    assert mine.keys() == theirs.keys() == tensors.keys()
    for name, value in theirs.items():
        assert mine[name].dtype == value.dtype and mine[name].shape == value.shape and torch.equal(mine[name], value)
    with safe_open(str(tmp_path / "mine.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    with pytest.raises(RuntimeError, match="announced"):  # a tensor other than its header says
        write_safetensors(tmp_path / "bad.safetensors", {"w": (torch.float32, (3, 4), lambda: tensors["w"])})


def test_a_plan_is_held_against_the_container_s_memory_limit(tiny_dirs, tmp_path: Path, capsys) -> None:
    """MemTotal and the topology file do not show a container's memory limit: a plan that needed
    more was killed by the container's out-of-memory killer once the ranks had loaded (after the
    model check and the data, minutes into a large run). What must be held beyond the limit is
    refused before any rank starts; what the plan also counts for each CPU rank's process, said."""
    from zoplan.errors import ZoplanError
    from zoplan.models import load_model_shape
    from zoplan.planner import plan as make_plan
    from zoplan.runtime.launch import check_container_memory
    from zoplan.sim.costs import GPU_RESERVE_BYTES, StepCosts, Workload
    from zoplan.topology import load_topology
    from zoplan.topology.container import Limits

    shape = load_model_shape(str(tiny_dirs["tiny-opt"] / "config.json"))
    report = make_plan(str(tiny_dirs["tiny-opt"] / "config.json"), "cpu-local", global_batch=4, seq_len=32)
    machine = load_topology("cpu-local")
    costs = StepCosts(machine, Workload(shape, 4, 32), report.plan.to_layout())
    need, ranks = costs.ram_need_bytes(), len(costs.cpu_ranks())
    held = need - GPU_RESERVE_BYTES * ranks
    assert ranks == 2 and 0 < held < need
    file = Path("/sys/fs/cgroup/memory.max")
    check_container_memory(report.plan, machine, shape, Limits())  # no limit: nothing to say
    check_container_memory(report.plan, machine, shape, Limits(memory_bytes=need, memory_file=file))
    assert capsys.readouterr().err == ""
    check_container_memory(report.plan, machine, shape, Limits(memory_bytes=need - 1, memory_file=file))
    said = capsys.readouterr().err
    assert "the ranks may be killed by its out-of-memory killer" in said and str(file) in said
    with pytest.raises(ZoplanError, match="its out-of-memory killer would stop the run") as refused:
        check_container_memory(report.plan, machine, shape, Limits(memory_bytes=held - 1, memory_file=file))
    assert "zoplan topo detect" in (refused.value.fix or "")


def test_a_rank_killed_by_the_container_s_out_of_memory_killer_is_said_so(tmp_path: Path) -> None:
    """The container's own killer (its count of kills rose while the ranks ran), not "the machine
    runs out of host memory" and `dmesg` (most often forbidden in a container), whose advice
    (fewer ranks, a smaller micro-batch) then resumed into the same kill."""
    import signal as signals

    from zoplan.runtime.launch import _killed
    from zoplan.topology.container import Limits

    events = tmp_path / "memory.events"
    events.write_text("low 0\noom 1\noom_kill 1\n")
    limits = Limits(memory_bytes=3 << 30, memory_file=tmp_path / "memory.max", oom_file=events)
    args = (tmp_path / "worker-node0.log", "the journal holds 6 completed step(s)", "continue with --resume")
    contained = _killed("a rank", signals.SIGKILL, limits, 0, *args)
    assert "by the out-of-memory killer of this process's container at its memory limit of 3 GiB" in contained.message
    assert "dmesg" not in contained.message and "zoplan topo detect" in (contained.fix or "")
    for before, limit in ((1, limits), (None, Limits())):  # no kill since, or no limit: the machine's
        said = _killed("a rank", signals.SIGKILL, limit, before, *args)
        assert "most often by the kernel's out-of-memory killer" in said.message and "container" not in said.message
    bus = _killed("a rank", signals.SIGBUS, limits, 0, *args)
    assert "mapped changed" in bus.message and bus.fix == "continue with --resume"  # (not "free host memory")

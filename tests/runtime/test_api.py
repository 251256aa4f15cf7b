"""``zoplan.runtime.fine_tune``: zoplan run from Python, the same implementation and options."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from safetensors.torch import load_file

from zoplan.errors import ZoplanError
from zoplan.layout import Pins
from zoplan.runtime import fine_tune

README = Path(__file__).parents[2] / "README.md"


def python_blocks() -> list[str]:
    """The README's Python examples, in order."""
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def weights(out: Path) -> dict:
    return load_file(str(out / "model" / "model.safetensors"))


def test_fine_tune_is_zoplan_run(tiny_dirs, tmp_path: Path) -> None:
    """The same options give the same run, bit for bit, as the command line; the summary is the
    command's closing lines; a resume with a planned option given again warns that it is ignored."""
    options = dict(lr=1e-3, eps=1e-3, global_batch=4, label_words="dull,fine")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"review {i}", "label": i % 2}) + "\n" for i in range(24)))
    api = fine_tune(tiny_dirs["tiny-opt"], data, steps=3, output=tmp_path / "api", quiet=True, **options)
    cli = subprocess.run(
        [sys.executable, "-m", "zoplan.cli", "run", "--model", str(tiny_dirs["tiny-opt"]), "--data", str(data)]
        + ["--steps", "3", "-o", str(tmp_path / "cli"), "--lr", "1e-3", "--eps", "1e-3", "-b", "4"]
        + ["--label-words", "dull,fine"],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert cli.returncode == 0, cli.stderr
    a, b = weights(tmp_path / "api"), weights(tmp_path / "cli")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert api.steps == 3 and api.model == tmp_path / "api" / "model" and api.eval_before is not None
    assert str(api).replace(str(tmp_path / "api"), "OUT") == "\n".join(
        line.replace(str(tmp_path / "cli"), "OUT") for line in cli.stdout.strip().splitlines()[-4:]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        more = fine_tune(resume=tmp_path / "api", steps=4, lr=1e-2, quiet=True)
    assert more.steps == 4 and any("lr ignored: the run in" in str(w.message) for w in caught)


def test_fine_tune_refuses_what_zoplan_run_refuses(tmp_path: Path) -> None:
    with pytest.raises(ZoplanError, match="no option 'stepz': did you mean 'steps'"):
        fine_tune(stepz=3)
    with pytest.raises(ZoplanError, match="lr"):
        fine_tune(lr=-1.0, output=tmp_path / "o")
    plan = tmp_path / "plan.yaml"
    plan.write_text("not a plan")
    # in fine_tune's words, not the command line's (--pertp, --steps)
    with pytest.raises(ZoplanError, match=r'pins\["perturbation"\] set what the plan'):
        fine_tune(plan=plan, pins={"perturbation": 2}, output=tmp_path / "o")
    with pytest.raises(ZoplanError, match="^steps must be at least 1, got 0") as said:
        fine_tune(steps=0, output=tmp_path / "o")
    assert "--" not in str(said.value)
    # an adapter's setting for another kind of training was ignored: the run trained every weight
    with pytest.raises(ZoplanError, match=r"^lora_rank applies to tuning lora, but the run trains every weight"):
        fine_tune(lora_rank=4, output=tmp_path / "o")
    with pytest.raises(
        ZoplanError, match=r"^prefix_tokens applies to tuning prefix, but the run trains a lora adapter"
    ):
        fine_tune(tuning="lora", prefix_tokens=3, output=tmp_path / "o")
    with pytest.raises(ZoplanError, match="both say what is held out"):
        fine_tune(eval_data="sentiment", eval_fraction=0.2, data="sentiment", output=tmp_path / "o")
    # a list where one path or name goes was read as its str() ("['sentiment']" is no data set);
    # True where a number goes was 1
    with pytest.raises(ZoplanError, match=r"fine_tune\(data=\.\.\.\) takes a path or a name .*not list"):
        fine_tune(data=["sentiment"], output=tmp_path / "o")
    with pytest.raises(ZoplanError, match=r"fine_tune\(model=\.\.\.\) takes a path or a name"):
        fine_tune(model=("tiny-opt",), output=tmp_path / "o")
    with pytest.raises(ZoplanError, match=r"fine_tune\(steps=True\) takes a number"):
        fine_tune(steps=True, output=tmp_path / "o")
    with pytest.raises(ZoplanError, match=r"fine_tune\(global_batch=False\) takes a number"):
        fine_tune(global_batch=False, output=tmp_path / "o")
    # "3" is the command line's way to write 3: a string where a number goes is refused, as pins'
    with pytest.raises(ZoplanError, match=r"fine_tune\(steps='3'\) takes a number, not a string"):
        fine_tune(steps="3", output=tmp_path / "o")
    with pytest.raises(ZoplanError, match=r"fine_tune\(lr='1e-3'\) takes a number, not a string"):
        fine_tune(lr="1e-3", output=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_the_readme_python_example_runs(tiny_dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README's Python block, with this test's tiny model, bundled data and 2 steps."""
    code = python_blocks()[0]
    assert len(code.strip().splitlines()) <= 10  # the promise: under 10 lines
    code = (
        code.replace('"path/to/hf-model"', repr(str(tiny_dirs["tiny-opt"])))
        .replace('"train.jsonl"', '"sentiment"')
        .replace("steps=200", "steps=2")
        .replace("lr=1e-5", "lr=1e-3")
    )
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["result"].steps == 2 and (tmp_path / "run1" / "model" / "config.json").exists()
    assert type(scope["model"]).__name__ == "OPTForCausalLM"


@pytest.mark.parametrize(
    "pins, said",
    [
        ({"pertp": 2}, r"pins\[\"pertp\"\] is not a pin of zoplan run: did you mean 'perturbation'\?"),
        ({"perturbaton": 2}, r"pins\[\"perturbaton\"\] is not a pin of zoplan run: did you mean 'perturbation'\?"),
        ({"perturbation": "2"}, r"pins\[\"perturbation\"\] must be a whole number \(an int\), 1 or 2, got '2' \(str\)"),
        ({"perturbation": 3}, r"pins\[\"perturbation\"\] must be 1 or 2, got 3"),
        ({"data": True}, r"pins\[\"data\"\] must be a whole number \(an int\), 1 or more, got True \(bool\)"),
        ({"slices": 129}, r"pins\[\"slices\"\] must be from 1 to 128, got 129"),
        ({"resident": -1}, r"pins\[\"resident\"\] must be 0 or more, got -1"),
        ({"micro_batch": 2.0}, r"pins\[\"micro_batch\"\] must be a whole number \(an int\), 1 or more, got 2.0"),
        ({"micro_batch": 16}, r"pins\[\"micro_batch\"\] 16 is more than the global batch \(8\)"),
        ({"upload": "foo"}, r"pins\[\"upload\"\] must be 'whole' or 'sliced', got 'foo'"),
        # a device of another machine: said in the call's words (it was --gpus's)
        ({"gpus": "rank0,rank9"}, r"pins\[\"gpus\"\] names 'rank9', not a device of topology 'cpu-local'"),
        (
            {"wire_dtype": "FP16"},
            r"pins\[\"wire_dtype\"\] must be one of 'fp32', 'bf16', 'fp16', got 'FP16': did you mean 'fp16'\?",
        ),
        ({"wire_dtype": 16}, r"pins\[\"wire_dtype\"\] must be a str, one of 'fp32', 'bf16', 'fp16', got 16 \(int\)"),
        ({"gpus": "rank0,rank0"}, r"pins\[\"gpus\"\] names 'rank0' twice"),
        ({"gpus": ["rank0", 1]}, r"pins\[\"gpus\"\] must list device names \(non-empty strs\), got 1 \(int\)"),
        ({"gpus": 2}, r"pins\[\"gpus\"\] must be a list of device names, got 2 \(int\)"),
        ({"gpus": []}, r"pins\[\"gpus\"\] names no device"),
        (
            {"prefetch": 2},
            r"pins\[\"prefetch\"\] is not a pin of zoplan run: a plan holds it \(zoplan plan --prefetch\)",
        ),
        ("perturbation=2", r"pins must be a dict of zoplan run's pins by name, got 'perturbation=2' \(str\)"),
        (Pins(perturbation="2"), r"pins\[\"perturbation\"\] must be a whole number \(an int\), 1 or 2, got '2'"),
    ],
    ids=repr,
)
def test_pins_are_checked_here_in_pythons_words(tmp_path: Path, pins: object, said: str) -> None:
    """Each pin by its name in the call (pins["perturbation"], not --pertp): an unknown one with the
    one meant, a wrong type with the type expected, a bad value with the values allowed; before
    anything starts or is written (not a TypeError from Pins(**pins), a string of GPU names taken
    letter by letter, or "no layout matches")."""
    with pytest.raises(ZoplanError, match=said) as caught:
        fine_tune(steps=1, pins=pins, output=tmp_path / "o", quiet=True)
    assert caught.value.message.startswith("pins")  # the argument as the call wrote it
    assert not (tmp_path / "o").exists()


def test_pins_reach_the_run_as_zoplan_run_takes_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Good pins become the layout.Pins of the run: device names as a list or comma-separated (as
    --gpus takes them), numpy ints, the vocabulary's words; every pin of zoplan run is checked."""
    import numpy as np

    from zoplan.runconfig import PIN_FLAGS
    from zoplan.runtime import api
    from zoplan.vocab import Upload

    assert set(api._PIN_NUMBERS) | set(api._PIN_WORDS) | {"gpus"} == set(PIN_FLAGS)
    seen = []

    def configure(given, resume):
        seen.append(given["pins"])
        raise ZoplanError("stop here")

    monkeypatch.setattr("zoplan.runtime.launch.configure", configure)
    for gpus in ("rank0, rank1", ["rank0", "rank1"]):
        with pytest.raises(ZoplanError, match="stop here"):
            fine_tune(
                pins={
                    "gpus": gpus,
                    "perturbation": np.int64(2),
                    "upload": Upload.SLICED,
                    "wire_dtype": "bf16",
                    "data": None,
                }
            )
    want = Pins(perturbation=2, gpus=("rank0", "rank1"), upload="sliced", wire_dtype="bf16")
    assert seen == [want, want] and type(seen[0].perturbation) is int and type(seen[0].upload) is str


@pytest.mark.parametrize(
    "option, said",
    [
        ("learning_rate", "did you mean 'lr'"),
        ("epsilon", "did you mean 'eps'"),
        ("zo_eps", "did you mean 'eps'"),
        ("batch_size", "did you mean 'global_batch'"),
        ("max_steps", "did you mean 'steps'"),
        ("output_dir", "did you mean 'output'"),
        ("resum", "did you mean 'resume'"),
        ("pertp", r"did you mean pins=\{\"perturbation\": \.\.\.\}"),
        ("micro_batch", r"did you mean pins=\{\"micro_batch\": \.\.\.\}"),
        ("weight_decay", r"zoplan run takes it from a plan \(zoplan plan --weight-decay\)"),
    ],
)
def test_an_unknown_option_gets_the_one_meant(option: str, said: str) -> None:
    """Names known from Hugging Face's TrainingArguments, MeZO or the command line's flags lead to
    fine_tune's own, not only its closest spelling."""
    with pytest.raises(ZoplanError, match=f"fine_tune\\(\\) has no option '{option}': {said}"):
        fine_tune(**{option: 1})


def test_the_options_listed_are_the_callers_and_none_the_run_records_itself() -> None:
    """The fix listed the run's own record (plan_stamp, which a caller setting it would forge) and
    not resume; the record is refused as an option."""
    with pytest.raises(ZoplanError) as said:
        fine_tune(plan_stamp="x")
    assert said.value.message == "fine_tune() has no option 'plan_stamp'"
    listed = said.value.fix.split(": ", 1)[1].split(", ")
    assert "resume" in listed and "steps" in listed and "plan_stamp" not in listed


def test_run_messages_are_said_in_fine_tunes_words() -> None:
    """zoplan run's flags become fine_tune's names; a command to type keeps its own."""
    from zoplan.runtime.api import in_its_words

    said = (
        "--steps 3 is fewer than the 6 step(s) done; give --steps 6, or continue it with --resume; "
        "--pertp 3 and --ddp; --wide stays (no such option); plan with `zoplan plan --prefetch 2`, "
        "or zoplan plan --topology x.yaml -o plan.yaml"
    )
    assert in_its_words(said) == (
        "steps=3 is fewer than the 6 step(s) done; give steps=6, or continue it with resume; "
        'pins["perturbation"]=3 and pins["data"]; --wide stays (no such option); plan with '
        "`zoplan plan --prefetch 2`, or zoplan plan --topology x.yaml -o plan.yaml"
    )


def test_the_runs_warnings_are_python_warnings_in_fine_tunes_words(tmp_path: Path, monkeypatch, capsys) -> None:
    """What zoplan run prints as a warning (here: a learning rate too small to learn, said after
    2 steps instead of 20), fine_tune raises as a Python warning, from the caller's line, quiet or
    not; nothing of it goes to stderr."""
    from zoplan.records import StallCheck
    from zoplan.runtime import launch

    monkeypatch.setattr(launch, "StallCheck", lambda **given: StallCheck(steps=2))
    with pytest.warns(UserWarning, match=r"likely too small .*try 10x \(lr=1e-08") as caught:
        fine_tune(steps=2, lr=1e-9, eval_every=0, quiet=True, output=tmp_path / "o")
    assert [w.filename for w in caught if "likely too small" in str(w.message)] == [__file__]
    assert "likely too small" not in capsys.readouterr().err


def test_a_call_leaves_the_callers_process_as_it_was_and_says_where_its_output_is(tmp_path: Path, monkeypatch) -> None:
    """fine_tune set CUDA_DEVICE_ORDER in the caller's environment for good (renumbering a
    notebook's own later CUDA devices), and its summary kept a relative output: after an
    os.chdir, ``summary.model`` was taken for a hub id and ``print(summary)`` failed."""
    import os

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    before = dict(os.environ)
    summary = fine_tune(steps=2, output="rel", quiet=True, eval_every=0)
    assert dict(os.environ) == before
    assert summary.output == tmp_path / "rel" and summary.model == tmp_path / "rel" / "model"
    monkeypatch.chdir("/")
    assert summary.model.is_dir() and f"wrote {tmp_path / 'rel'}/model" in str(summary)


def test_a_call_stopped_by_ctrl_c_raises_a_keyboard_interrupt_with_the_call_that_continues(tmp_path: Path) -> None:
    """A Ctrl-C came out of fine_tune as a ZoplanError, an Exception: ``except Exception`` around
    a call (a sweep going on to its next setting) took it, and the Ctrl-C never stopped the sweep."""
    import signal
    import threading
    import time

    from zoplan.errors import Stopped

    out, main = tmp_path / "run", threading.get_ident()

    def ctrl_c_after_a_step() -> None:
        for _ in range(600):
            journal = out / "journal.jsonl"
            if journal.is_file() and journal.read_text().count("\n") >= 1:
                break
            time.sleep(0.1)
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=ctrl_c_after_a_step, daemon=True).start()
    with pytest.raises(Stopped) as stopped:
        fine_tune(steps=10_000, output=out, quiet=True, eval_every=0)
    assert isinstance(stopped.value, KeyboardInterrupt) and not isinstance(stopped.value, Exception)
    assert stopped.value.status == 130 and "stopped by SIGINT after" in stopped.value.message
    assert stopped.value.fix is not None and f"fine_tune(resume='{out}', steps=10000)" in stopped.value.fix


def test_the_call_that_continues_a_stopped_run_names_it_by_its_absolute_path(tmp_path: Path, monkeypatch) -> None:
    """fine_tune(output="rel") stopped: its fix said fine_tune(resume='rel', ...), which an os.chdir
    since breaks (the summary's paths are absolute; the fix's too now)."""
    from zoplan.errors import Stopped
    from zoplan.runtime import launch

    monkeypatch.chdir(tmp_path)

    def stopped_at_once(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "_follow", stopped_at_once)  # a Ctrl-C as the ranks start
    with pytest.raises(Stopped) as stopped:
        fine_tune(steps=3, output="rel", quiet=True, eval_every=0)
    assert str(tmp_path / "rel") in stopped.value.message or str(tmp_path / "rel") in (stopped.value.fix or "")


def test_examples_longer_than_a_sequence_are_said(tmp_path: Path) -> None:
    """Prompts cut to --seq-len lost their start without a word; the run says how many (here as
    a Python warning), once, and metrics.jsonl keeps the note."""
    import json

    data = tmp_path / "long.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": "a long review of a film " * (1 + i % 4), "label": i % 2}) + "\n" for i in range(40)
        )
    )
    with pytest.warns(UserWarning, match=r"of the 36 training examples are longer than a sequence \(16 tokens\)"):
        fine_tune(data=data, seq_len=16, steps=1, quiet=True, eval_every=0, output=tmp_path / "o")
    notes = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert sum("note" in row for row in notes) == 1

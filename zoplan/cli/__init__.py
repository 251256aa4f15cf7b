"""The ``zoplan`` command line: parse, call one library function, render.

Every user error is a ZoplanError: printed as one message (with a fix when there is one) on
stderr, exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.text import Text

from zoplan.errors import ZoplanError
from zoplan.limits import MAX_MEASURED_STEPS, MAX_STEPS, MAX_TOKENS
from zoplan.runconfig import CalibrateConfig, RunConfig, option
from zoplan.vocab import Dtype, Method, Movers, Objective, Schedule, Upload

if TYPE_CHECKING:
    from zoplan.planfile import Plan
    from zoplan.sim import SimResult

app = typer.Typer(
    help="Plan and run distributed, memory-offloaded zeroth-order fine-tuning of LLMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
topo_app = typer.Typer(help="Bundled and custom machine topologies.", no_args_is_help=True)
models_app = typer.Typer(help="Model shape presets.", no_args_is_help=True)
recipes_app = typer.Typer(help="MeZO's task recipes (prompts, label words, hyper-parameters).", no_args_is_help=True)
app.add_typer(topo_app, name="topo")
app.add_typer(models_app, name="models")
app.add_typer(recipes_app, name="recipes")


def _version(value: bool) -> None:
    if value:
        from zoplan import __version__

        print(f"zoplan {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print zoplan's version and exit"
    ),
) -> None:
    """Plan and run distributed, memory-offloaded zeroth-order fine-tuning of LLMs."""


def _console(stderr: bool = False) -> Console:
    """The console for stdout (or stderr). Tables are wide; when the output is not a terminal (a
    pipe, a file, CI logs) rich would wrap them at 80 columns, so give them room instead, and keep
    a sentence on one line however long, as a file expects (rich would break it at the width).
    (COLUMNS is left alone there: a pipe often inherits a terminal's, or a test runner's 80.)"""
    if (sys.stderr if stderr else sys.stdout).isatty():
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=160, soft_wrap=True)


out, err = _console(), _console(stderr=True)


def _needs_runtime(command: str) -> None:
    """Refuse ``command`` where the runtime's packages are missing (an install of the planner
    alone, ``pip install -e .``), naming them, before anything imports one."""
    from zoplan.runtime import INSTALL, missing_packages

    missing = missing_packages()
    if missing is not None:
        raise ZoplanError(f"zoplan {command} runs the runtime, which needs {missing}: not installed here", fix=INSTALL)


def _gpus(value: Optional[str]) -> Optional[tuple[str, ...]]:
    return tuple(g.strip() for g in value.split(",") if g.strip()) if value is not None else None


# what a run trains (zoplan.tuning): the same options for `zoplan plan` and `zoplan run`
TUNING_OPTIONS = {
    "tuning": typer.Option(
        None,
        "--tuning",
        **option("tuning"),
        help="what is trained: every weight, or LoRA or a prefix on read-only blocks (zoplan run: without a plan)",
    ),
    "lora_rank": typer.Option(None, "--lora-rank", **option("lora_rank"), help="--tuning lora: the rank"),
    "lora_alpha": typer.Option(
        None, "--lora-alpha", **option("lora_alpha"), help="--tuning lora: the scale alpha (/ rank)"
    ),
    "prefix_tokens": typer.Option(
        None, "--prefix-tokens", **option("prefix_tokens"), help="--tuning prefix: trained tokens per block"
    ),
}


@app.command("plan")
def plan_cmd(
    model: str = typer.Option(
        "opt-175b",
        "--model",
        "-m",
        help="preset name, path to a Hugging Face config.json (or its directory), or tiny-opt / tiny-llama / tiny-qwen2",
    ),
    topology: str = typer.Option("dgx-a100", "--topology", "-t", help="bundled topology name or YAML path"),
    global_batch: int = typer.Option(16, "--global-batch", "-b", help="sequences per step, all replicas together"),
    seq_len: Optional[int] = typer.Option(
        None,
        "--seq-len",
        "-s",
        help="tokens per sequence (default: the profile's; else 512, or the model's positions if fewer)",
    ),
    dtype: Optional[Dtype] = typer.Option(
        None,
        "--dtype",
        help="compute dtype of the parameters (default: the profile's; else bf16 on GPUs, fp32 on CPU ranks)",
    ),
    objective: Objective = typer.Option(Objective.TIME, "--objective", help="rank by step time or by $ per token"),
    top: int = typer.Option(5, "--top", "-k", help="how many layouts to show (best of each parallel shape)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="write the best plan to this YAML file"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of tables"),
    pertp: Optional[int] = typer.Option(None, "--pertp", help="pin the perturbation degree (1 or 2)"),
    ddp: Optional[int] = typer.Option(None, "--ddp", help="pin the data-parallel degree per node"),
    nodes: Optional[int] = typer.Option(
        None, "--nodes", help="pin how many of the topology's nodes to use (default: the best number)"
    ),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="pin the compute GPUs, comma separated, in rank order"),
    slices: Optional[int] = typer.Option(None, "--slices", help="pin slices per block (sliced uploads)"),
    wire_dtype: Optional[Dtype] = typer.Option(None, "--wire-dtype", help="pin the host-copy / PCIe dtype"),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="pin the micro-batch"),
    prefetch: Optional[int] = typer.Option(None, "--prefetch", help="pin the blocks buffered ahead"),
    resident: Optional[int] = typer.Option(None, "--resident", help="pin how many blocks stay on the GPUs"),
    upload: Optional[Upload] = typer.Option(None, "--upload", help="pin whole-block or sliced uploads"),
    movers: Optional[Movers] = typer.Option(None, "--movers", help="sliced uploads: compute GPUs only or all GPUs"),
    eps: Optional[float] = typer.Option(
        None, "--eps", help="perturbation scale (default 1e-3; MeZO's 1e-2 for LoRA, 1e-1 for a prefix)"
    ),
    lr: Optional[float] = typer.Option(
        None,
        "--lr",
        help="learning rate (default 1e-6; MeZO's 5e-5 for LoRA, 1e-3 for a prefix; 1e-3 for the tiny models)",
    ),
    tuning: Optional[Method] = TUNING_OPTIONS["tuning"],
    lora_rank: Optional[int] = TUNING_OPTIONS["lora_rank"],
    lora_alpha: Optional[float] = TUNING_OPTIONS["lora_alpha"],
    prefix_tokens: Optional[int] = TUNING_OPTIONS["prefix_tokens"],
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    seed: int = typer.Option(0, "--seed"),
    steps: int = typer.Option(1000, "--steps", min=1, max=MAX_STEPS, help="training steps recorded in the plan"),
    lr_schedule: Schedule = typer.Option(
        Schedule.CONSTANT,
        "--lr-schedule",
        help="the learning rate over --steps: Hugging Face's linear or cosine decay without warm-up "
        "(step s of N at lr × (1 - s/N), or lr × (1 + cos(π s/N)) / 2)",
    ),
    profile: Optional[Path] = typer.Option(None, "--profile", help="plan with the figures `zoplan calibrate` measured"),
    wide: bool = typer.Option(False, "--wide", help="every column of the table (the default ones fit 80 columns)"),
) -> None:
    """Find the fastest (or cheapest) layout of a model on a machine and write it as a plan."""
    from zoplan.planfile import write_plan, zo_settings
    from zoplan.planner import plan
    from zoplan.layout import Pins

    from zoplan.models import TINY_LR, TINY_MODELS

    from zoplan.tuning import default_eps, default_lr

    from zoplan.runconfig import check_adapter_settings, make

    given = {"tuning": tuning, "lora_rank": lora_rank, "lora_alpha": lora_alpha, "prefix_tokens": prefix_tokens}
    check_adapter_settings(given)
    trained = make(**{k: v for k, v in given.items() if v is not None}).to_tuning()
    if lr is None:
        lr = TINY_LR if model in TINY_MODELS else default_lr(trained)
    eps = default_eps(trained) if eps is None else eps
    zo = zo_settings(eps=eps, lr=lr, weight_decay=weight_decay, seed=seed, steps=steps, lr_schedule=lr_schedule.value)
    pins = Pins(
        perturbation=pertp,
        data=ddp,
        gpus=_gpus(gpus),
        slices=slices,
        wire_dtype=wire_dtype.value if wire_dtype else None,
        micro_batch=micro_batch,
        prefetch=prefetch,
        resident=resident,
        upload=upload.value if upload else None,
        movers=movers.value if movers else None,
        nodes=nodes,
    )
    if output is not None:  # before the search, which may take seconds
        from zoplan.fileio import check_writable

        check_writable(output, "plan")
    # large models on PCIe machines weigh hundreds of layouts: seconds (on a terminal only)
    with err.status(Text(f"planning {model} on {topology}"), spinner="dots") as status:

        def weighing(done: int, total: int) -> None:  # Text: names print literally, never as markup
            status.update(Text(f"planning {model} on {topology}: {done} of {total} layouts weighed"))

        report = plan(
            model,
            topology,
            global_batch=global_batch,
            seq_len=seq_len,
            pins=pins,
            objective=objective.value,
            dtype=dtype.value if dtype else None,
            top=top,
            zo=zo,
            profile=profile,
            progress=weighing,
            tuning=trained,
        )
    if output is not None:
        write_plan(report.plan, output)
    if as_json:
        from zoplan.cli.render import plan_warnings

        said = [line for lines in plan_warnings(report) for line in lines]
        print(json.dumps({**report.to_json(), "warnings": said}, indent=2, allow_nan=False))
        for line in said:  # (and for whoever reads the terminal: what the table's footer would say)
            err.print(Text(line if line.startswith("note:") else f"warning: {line}"), highlight=False, soft_wrap=True)
        return
    from zoplan.cli.render import plan_footer, plan_table

    out.print(plan_table(report, wide, out.width))
    out.print(plan_footer(report, wide))
    if output is not None:
        out.print(Text(f"wrote {output}  (inspect it with: zoplan timeline {output} --show)"))


def _hanging(listing: str, width: int) -> str:
    """A step program's listing (Program.describe) for ``width`` columns: an op's line too long
    goes on under its description, not under its stream and id."""
    import re

    from zoplan.program import DESCRIPTION_COLUMN, OP_INDENT

    # in a narrow terminal (52 columns or fewer) under the id's start instead: it still wraps
    indent = " " * (DESCRIPTION_COLUMN if width > DESCRIPTION_COLUMN + 20 else OP_INDENT + 4)
    lines = []
    for line in listing.splitlines():
        if len(line) <= width or not line.startswith(" " * OP_INDENT) or width <= len(indent) + 10:
            lines.append(line)
            continue
        # broken after a "," or ";" only: an op id ("d2h b3 r1") stays on one line
        head, *pieces = re.split(r"(?<=[;,]) ", line)
        for piece in pieces:
            if len(head) + 1 + len(piece) <= width:
                head += " " + piece
            else:
                lines.append(head)
                head = indent + piece
        lines.append(head)
    return "\n".join(lines)


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ZoplanError(
            f"{option} {text!r} is not a comma-separated list of whole numbers", fix=f"e.g. {option} 1,2,4"
        ) from None
    if any(v < 1 for v in values):
        raise ZoplanError(f"{option} {text!r}: every count must be at least 1", fix=f"e.g. {option} 1,2,4")
    return values


@app.command("compare")
def compare_cmd(
    model: str = typer.Option("opt-175b", "--model", "-m", help="preset name or path to a config.json"),
    topology: Optional[list[str]] = typer.Option(
        None,
        "--topology",
        "-t",
        help="a machine to compare (repeat, or commas: -t a,b; 'all' or none: every bundled GPU machine)",
    ),
    global_batch: int = typer.Option(16, "--global-batch", "-b"),
    seq_len: Optional[int] = typer.Option(
        None, "--seq-len", "-s", help="tokens per sequence (default 512, or the model's positions if fewer)"
    ),
    dtype: Optional[Dtype] = typer.Option(None, "--dtype", help="default: bf16 on GPUs, fp32 on CPU ranks"),
    objective: Objective = typer.Option(Objective.TIME, "--objective"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of a table"),
    tokens: Optional[float] = typer.Option(
        None,
        "--tokens",
        min=1,
        max=MAX_TOKENS,
        help="the verdict also gives the time and price of this many tokens (e.g. 1e9)",
    ),
    wide: bool = typer.Option(False, "--wide", help="every column of the table (the default ones fit 80 columns)"),
) -> None:
    """Which machine should I rent? The best layout on each machine side by side."""
    from zoplan.planner import compare

    with err.status("planning", spinner="dots") as status:  # machines plan one after another: seconds

        def planning(name: str, i: int, n: int) -> None:
            status.update(Text(f"planning {model} on {name} ({i + 1} of {n})"))

        results = compare(
            model,
            topology or [],
            global_batch=global_batch,
            seq_len=seq_len,
            objective=objective.value,
            dtype=dtype.value if dtype else None,
            progress=planning,
        )
    from zoplan.cli.render import verdict
    from zoplan.search import rented_per_hour

    if as_json:
        print(
            json.dumps(
                {
                    "model": model,
                    "machines": [
                        {"topology": name, "error": res.message}
                        if isinstance(res, ZoplanError)
                        else {
                            "topology": name,
                            "price_per_hour_usd": res.machine.spec.price_per_hour_usd,
                            "rented_per_hour_usd": rented_per_hour(res.machine, res.search.best.layout),
                            "speedup_vs_baseline": res.speedup_vs_baseline,
                            **res.summary(res.search.best),
                        }
                        for name, res in results
                    ],
                    "verdict": verdict(results, tokens),
                },
                indent=2,
                allow_nan=False,  # (strict JSON: every figure is finite)
            )
        )
    else:
        from zoplan.cli.render import compare_reasons, compare_table, compare_verdict

        out.print(compare_table(results, model, wide, out.width))
        for reason in compare_reasons(results):
            out.print(Text(reason, style="red"))
        out.print(Text(compare_verdict(results, tokens)))
    if all(isinstance(res, ZoplanError) for _, res in results):  # the model fits none: bad input, as plan's
        raise typer.Exit(code=2)


@app.command("timeline")
def timeline_cmd(
    plan_file: Path = typer.Argument(..., help="a plan written by `zoplan plan -o`"),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="write a Chrome trace (Perfetto, chrome://tracing)"
    ),
    show: bool = typer.Option(False, "--show", help="draw the step as a Gantt chart in the terminal"),
    png: Optional[Path] = typer.Option(None, "--png", help="draw the step with matplotlib (plot extra)"),
    width: Optional[int] = typer.Option(
        None, "--width", help="time columns of the terminal chart (default: as many as the terminal has room for)"
    ),
    topology: Optional[str] = typer.Option(None, "--topology", help="the topology file, if it moved since planning"),
    ops: bool = typer.Option(False, "--ops", help="list the step program: what each rank issues in a step, in order"),
    rank: Optional[list[str]] = typer.Option(None, "--rank", help="with --ops: only this rank (GPU id; repeatable)"),
) -> None:
    """Simulate a plan's step again and show it: trace file, terminal chart, PNG or its program."""
    from zoplan.sim import trace
    from zoplan.planner import timeline

    if rank and not ops:  # the chart and the trace show every rank: the option would do nothing
        raise ZoplanError("--rank chooses the ranks --ops lists", fix=f"add --ops: zoplan timeline {plan_file} --ops")
    if output is not None and output.suffix.lower() in (".png", ".svg", ".pdf", ".jpg", ".jpeg"):
        raise ZoplanError(
            f"-o writes a Chrome trace (JSON), not a picture: {output} would not open as one",
            fix=f"draw it with --png {output.with_suffix('.png')} (matplotlib), or name the trace {output.with_suffix('.json')}",
        )

    if width is not None:
        if not show and (output is not None or png is not None or ops):
            raise ZoplanError(
                "--width sets the terminal chart's time columns, and no chart is drawn",
                fix=f"add --show: zoplan timeline {plan_file} --show --width {width}",
            )
        trace.check_gantt_width(width)
    if png is not None and png.suffix.lower() != ".png":
        raise ZoplanError(
            f"--png draws a PNG: {png} would not open as what its name says",
            fix=f"name it {png.with_suffix('.png')}",
        )
    # everything asked for is checked before anything is written
    from zoplan.fileio import check_writable

    if output is not None:
        check_writable(output, "trace file")
    if png is not None:
        trace.require_matplotlib()
        check_writable(png, "PNG")
    tl = timeline(plan_file, topology)
    sim = tl.candidate.sim
    assert sim is not None and tl.program is not None  # timeline() simulates the plan's program
    if ops:
        ranks = list(dict.fromkeys(rank)) if rank else None  # a rank named twice is listed once
        out.print(Text(_hanging(tl.program.describe(ranks), out.width)), highlight=False, soft_wrap=True)
    if output is None and not show and png is None and not ops:
        show = True
    if output is not None:
        trace.write_trace(trace.chrome_trace(sim, tl.machine, title="simulated"), output)
        out.print(Text(f"wrote {output}: open it in https://ui.perfetto.dev or chrome://tracing"))
    if png is not None:
        trace.plot_png(sim, tl.machine, png)
        out.print(Text(f"wrote {png}"))
    if show:
        from zoplan.cli.render import launch_note, sensitivity_line

        out.print(trace.gantt(sim, tl.machine, width=width, fit=out.width if sys.stdout.isatty() else 120))
        out.print(launch_note(tl.machine, tl.workload, tl.candidate), end="")
        # wrapped at the terminal's width, as the chart fits it; one line into a file or a pipe
        tty = sys.stdout.isatty()
        out.print(Text(sensitivity_line(sim.step_time_s, tl.sensitivity)), highlight=False, soft_wrap=not tty)


@app.command("run")
def run_cmd(
    plan: Optional[Path] = typer.Argument(None, help="a plan from `zoplan plan -o`; omitted: plan for this machine"),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", **option("model"), help="local directory, hub id, or tiny-opt / tiny-llama / tiny-qwen2"
    ),
    data: Optional[str] = typer.Option(
        None,
        "--data",
        "-d",
        **option("data"),
        help="a .jsonl or .csv file, 'sentiment' / 'sentiment-text' (bundled), 'long-text' "
        "(bundled texts filling the sequence length), or a datasets name",
    ),
    steps: Optional[int] = typer.Option(
        None, "--steps", "-n", **option("steps"), help="training steps (the run's total)"
    ),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", **option("output"), help="directory for weights, journal and metrics"
    ),
    global_batch: Optional[int] = typer.Option(
        None, "--global-batch", "-b", **option("global_batch"), help="without a plan: sequences per step"
    ),
    seq_len: Optional[int] = typer.Option(
        None, "--seq-len", "-s", **option("seq_len"), help="without a plan: tokens per sequence"
    ),
    topology: Optional[str] = typer.Option(
        None, "--topology", "-t", **option("topology"), help="without a plan: the machine"
    ),
    pertp: Optional[int] = typer.Option(None, "--pertp", help="without a plan: pin the perturbation degree"),
    ddp: Optional[int] = typer.Option(None, "--ddp", help="without a plan: pin the data-parallel degree"),
    slices: Optional[int] = typer.Option(None, "--slices", help="without a plan: pin slices per block"),
    wire_dtype: Optional[Dtype] = typer.Option(None, "--wire-dtype", help="without a plan: pin the host-copy dtype"),
    gpus: Optional[str] = typer.Option(
        None, "--gpus", help="without a plan: pin the compute devices (rank0,rank1 on CPU)"
    ),
    upload: Optional[Upload] = typer.Option(None, "--upload", help="without a plan: whole-block or sliced uploads"),
    resident: Optional[int] = typer.Option(None, "--resident", help="without a plan: blocks kept on the devices"),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="without a plan: pin the micro-batch"),
    lr: Optional[float] = typer.Option(
        None,
        "--lr",
        help="without a plan: learning rate (1e-6; MeZO's 5e-5 for LoRA, 1e-3 for a prefix; 1e-3 for the tiny models)",
    ),
    eps: Optional[float] = typer.Option(
        None, "--eps", help="without a plan: perturbation scale (1e-3; MeZO's 1e-2 for LoRA, 1e-1 for a prefix)"
    ),
    tuning: Optional[Method] = TUNING_OPTIONS["tuning"],
    lora_rank: Optional[int] = TUNING_OPTIONS["lora_rank"],
    lora_alpha: Optional[float] = TUNING_OPTIONS["lora_alpha"],
    prefix_tokens: Optional[int] = TUNING_OPTIONS["prefix_tokens"],
    seed: Optional[int] = typer.Option(None, "--seed", **option("seed"), help="without a plan: run seed"),
    prompt: Optional[str] = typer.Option(
        None,
        "--prompt",
        **option("prompt"),
        help="labelled data: what the model reads, {text} filled in; a label word follows",
    ),
    recipe: Optional[str] = typer.Option(
        None,
        "--recipe",
        help="one of MeZO's tasks (sst2, rte, cb, copa, squad): its prompt, label words, lr, eps and batch "
        "where not given",
    ),
    label_words: Optional[str] = typer.Option(
        None,
        "--label-words",
        **option("label_words"),
        help="labelled data: one word per class, comma-separated (label 0 is the first)",
    ),
    eval_data: Optional[str] = typer.Option(
        None,
        "--eval-data",
        help="held-out examples of their own (a file or name, as --data, of the same task): all of --data trains",
    ),
    eval_fraction: Optional[float] = typer.Option(
        None, "--eval-fraction", **option("eval_fraction"), help="the share of --data held out for evaluation"
    ),
    eval_every: Optional[int] = typer.Option(
        None,
        "--eval-every",
        **option("eval_every"),
        help="evaluate on the held-out split every N steps too (it is evaluated "
        "before the first step and after the last unless 0: never)",
    ),
    max_nonfinite: Optional[int] = typer.Option(
        None, "--max-nonfinite", **option("max_nonfinite"), help="stop after this many non-finite losses in a row"
    ),
    nnodes: Optional[int] = typer.Option(
        None, "--nnodes", **option("nnodes"), help="machines taking part (torchrun rendezvous)"
    ),
    node_rank: Optional[int] = typer.Option(
        None, "--node-rank", **option("node_rank"), help="this machine's index (0 .. --nnodes - 1)"
    ),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", **option("master_addr"), help="address of node 0"),
    master_port: Optional[int] = typer.Option(
        None, "--master-port", **option("master_port"), help="port on node 0 (needed with --nnodes > 1)"
    ),
    resume: Optional[Path] = typer.Option(
        None,
        "--resume",
        help="continue the run in this directory up to --steps (the "
        "options not given again keep the run's own, from its run.json)",
    ),
    max_restarts: Optional[int] = typer.Option(
        None, "--max-restarts", **option("max_restarts"), help="restart crashed ranks this many times (they resume)"
    ),
    snapshot_every: Optional[int] = typer.Option(
        None, "--snapshot-every", **option("snapshot_every"), help="write a snapshot every N steps (0: never)"
    ),
    snapshot_minutes: Optional[float] = typer.Option(
        None, "--snapshot-minutes", **option("snapshot_minutes"), help="write a snapshot every M minutes (0: never)"
    ),
    keep_snapshots: Optional[int] = typer.Option(
        None, "--keep-snapshots", **option("keep_snapshots"), help="snapshots kept (0: all of them)"
    ),
    journal_sync_every: Optional[int] = typer.Option(
        None,
        "--journal-sync-every",
        **option("journal_sync_every"),
        help="fsync the journal every N steps (slow disks)",
    ),
) -> None:
    """Fine-tune with a plan: the plan's ranks are forked on this machine (torchrun starts them
    across machines), gloo on CPU, NCCL on GPU.

    The run's settings are written to OUTPUT/run.json before any rank starts (zoplan.runconfig)."""
    # the options given on the command line, by setting (None: not given; the configuration has
    # the defaults); first, while the parameters are all there is
    given = {k: v for k, v in locals().items() if k in RunConfig.model_fields and v is not None}
    from zoplan import runconfig
    from zoplan.layout import Pins

    pins = Pins(
        perturbation=pertp,
        data=ddp,
        slices=slices,
        gpus=_gpus(gpus),
        wire_dtype=wire_dtype.value if wire_dtype else None,
        upload=upload.value if upload else None,
        resident=resident,
        micro_batch=micro_batch,
    )
    if runconfig.pin_flags(pins):
        given["pins"] = pins
    if label_words is not None:
        given["label_words"] = tuple(label_words.split(","))
    _needs_runtime("run")
    from zoplan.runtime.launch import configure, ignored_note, run

    cfg, ignored = configure(given, resume)
    if ignored and resume is not None:
        # the same command line again is the natural way to continue: a warning, not an error
        err.print(Text(f"warning: {ignored_note(ignored, resume)}"))
    result = run(cfg, resume=resume is not None)
    if cfg.node_rank == 0:
        for line in result.lines():
            out.print(Text(line))
    else:  # rank 0 keeps the journal, metrics and trained model: node 0 has the run's story
        out.print(
            Text(
                f"node {cfg.node_rank} of {cfg.nnodes}: done ({cfg.steps} steps); the journal, metrics "
                f"and trained model are in node 0's output directory, {cfg.output} holds this node's log"
            )
        )


@app.command("calibrate")
def calibrate_cmd(
    model: Optional[str] = typer.Option(
        None,
        "--model",
        "-m",
        **option("model", CalibrateConfig),
        help="directory, hub id or tiny-* (its shape is timed)",
    ),
    topology: Optional[str] = typer.Option(
        None,
        "--topology",
        "-t",
        **option("topology", CalibrateConfig),
        help="this machine's topology (bundled name or YAML)",
    ),
    micro_batch: Optional[int] = typer.Option(
        None, "--micro-batch", **option("micro_batch", CalibrateConfig), help="sequences per micro-batch to time"
    ),
    seq_len: Optional[int] = typer.Option(
        None, "--seq-len", "-s", **option("seq_len", CalibrateConfig), help="tokens per sequence to time"
    ),
    dtype: Optional[Dtype] = typer.Option(None, "--dtype", help="compute dtype (default fp32 on CPU, bf16 on GPU)"),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", **option("output", CalibrateConfig), help="the profile to write"
    ),
    steps: Optional[int] = typer.Option(
        None,
        "--steps",
        "-n",
        **option("steps", CalibrateConfig),
        help="engine steps timed per setting (more: steadier figures on a noisy machine)",
    ),
    micro_batches: Optional[str] = typer.Option(
        None,
        "--micro-batches",
        **option("micro_batches", CalibrateConfig),
        help="micro-batch counts to time, with 1 and 2 (e.g. 1,2,4,8 for plans with many)",
    ),
    spans: Optional[Path] = typer.Option(
        None,
        "--spans",
        metavar="DIR",
        help="keep every timed engine step: DIR/<setting>/spans-rank<R>.jsonl, the schema of a run's spans files",
    ),
) -> None:
    """Measure this machine with the runtime's own code and write a profile for `zoplan plan --profile`.

    The settings are one configuration (zoplan.runconfig.CalibrateConfig), which the ranks read."""
    # the options given (None: not given; the configuration has the defaults); first, while the
    # parameters are all there is
    given = {k: v for k, v in locals().items() if k in CalibrateConfig.model_fields and v is not None}
    from zoplan.runconfig import make_calibration

    if micro_batches is not None:
        given["micro_batches"] = _int_list(micro_batches, "--micro-batches")
    if dtype is not None:
        given["dtype"] = dtype.value
    cfg = make_calibration(**given)
    _needs_runtime("calibrate")
    from zoplan.runtime.calibrate import calibrate

    prof = calibrate(cfg)
    from zoplan.cli.render import profile_table

    out.print(profile_table(prof))
    out.print(
        Text(f"wrote {cfg.output}  (use it with: zoplan plan --topology {cfg.topology} --profile {cfg.output} ...)")
    )


@app.command("validate")
def validate_cmd(
    plan_file: Path = typer.Argument(..., metavar="PLAN", help="a plan from `zoplan plan -o`"),
    steps: int = typer.Option(
        20, "--steps", "-n", min=2, max=MAX_MEASURED_STEPS, help="training steps to measure (the first is left out)"
    ),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="the model's directory or hub id (default: the plan's tiny model)"
    ),
    data: str = typer.Option(
        "long-text",
        "--data",
        "-d",
        help="training data, as for `zoplan run`; the default fills every sequence, as the "
        "calibration's batches do (padded data also builds an attention mask per micro-batch)",
    ),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="run directory (default: a new temporary one)"),
    trace: Optional[Path] = typer.Option(
        None, "--trace", help="write the simulated and measured steps as one Chrome trace"
    ),
    skip: int = typer.Option(1, "--skip", min=0, help="first steps left out of the measurement (warm-up)"),
    pad: bool = typer.Option(
        True,
        "--pad/--no-pad",
        help="pad every batch to the plan's sequence length, as planned (--no-pad: as zoplan run)",
    ),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of a table"),
) -> None:
    """Run a plan for a few steps and compare its predicted step with the measured one, stage by stage."""
    import shutil
    import tempfile

    from zoplan.planfile import load_plan
    from zoplan.planner import timeline

    the_plan = load_plan(plan_file)
    if the_plan.layout.nodes > 1:  # (zoplan run would ask for --nnodes, which validate does not take)
        raise ZoplanError(
            f"{plan_file} spans {the_plan.layout.nodes} nodes, and validate runs a plan on this one machine",
            fix="validate one node's step: plan it with --nodes 1 (zoplan plan --topology ... --nodes 1 -o plan.yaml); "
            "the nodes add only the loss all-reduce and the wait for the slowest",
        )
    predicted = timeline(plan_file)
    simulated = predicted.candidate.sim
    assert simulated is not None  # timeline() simulates the plan
    _needs_runtime("validate")
    from zoplan.models import tiny_name

    model = model or tiny_name(the_plan.model.name)
    if model is None:
        raise ZoplanError(
            f"{plan_file} is for model '{the_plan.model.name}': say where its weights are",
            fix="pass --model DIRECTORY (or hub id) of that model",
        )
    if steps <= skip:
        raise ZoplanError(
            f"--steps {steps} leaves nothing to measure after --skip {skip}",
            fix=f"use --steps more than --skip (e.g. --steps {skip + 10}), or a smaller --skip",
        )
    if trace is not None:  # refused now, not after the run it would describe
        from zoplan.fileio import check_writable

        check_writable(trace, "trace file")
    if output is not None:
        if output.is_dir() and any(output.iterdir()):  # (zoplan run's refusal would offer a resume)
            raise ZoplanError(
                f"output directory {output} is not empty: a previous run's output is not overwritten",
                fix="choose a new --output directory, or remove the old one",
            )
    from zoplan.runtime.launch import _is_cpu_machine
    from zoplan.runtime.scratch import before_measuring, measured_beside

    # what the run measures is the machine's: what runs beside it takes part of it
    beside, warning = before_measuring("validate", _is_cpu_machine(predicted.machine))
    if warning:
        print(warning, file=sys.stderr)

    def said_after() -> None:  # after the report: a launch may have started meanwhile
        warning = measured_beside(beside, "validate")
        if warning:
            print(warning, file=sys.stderr)

    if output is not None:
        _validate(output, the_plan, plan_file, simulated, model, data, steps, trace, skip, pad, as_json)
        said_after()
        return
    # a temporary run directory goes when validate ends, however it ends (--output keeps one)
    scratch = Path(tempfile.mkdtemp(prefix="zoplan-validate-"))
    try:
        _validate(scratch / "run", the_plan, plan_file, simulated, model, data, steps, trace, skip, pad, as_json)
        said_after()
    except ZoplanError as exc:
        # the run's directory goes now: a fix that continues it there (a stopped run's resume) is none
        said = exc.fix if exc.fix and str(scratch) not in exc.fix else "run the same command again"
        raise type(exc)(
            exc.message.replace(f" in {scratch / 'run'}", ""),
            fix=f"{said}; pass --output DIR to keep the run (its logs, and a stopped run to resume)",
            status=exc.status,
        ) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _validate(
    run_dir: Path,
    the_plan: Plan,
    plan_file: Path,
    simulated: SimResult,
    model: str,
    data: str,
    steps: int,
    trace: Optional[Path],
    skip: int,
    pad: bool,
    as_json: bool,
) -> None:
    from zoplan import validate as zv
    from zoplan.planner import timeline
    from zoplan.runconfig import make
    from zoplan.runtime.launch import run

    run(make(plan=plan_file, model=model, data=data, steps=steps, output=run_dir, quiet=as_json, pad_to_seq_len=pad))
    result = zv.compare(zv.measure(run_dir, the_plan, skip), simulated, the_plan.prediction.gpu_memory_bytes)
    if trace is not None:
        from zoplan.sim.trace import write_trace

        write_trace(zv.combined_trace(result, simulated, timeline(plan_file).machine), trace)
    kept = not run_dir.parent.name.startswith("zoplan-validate-")  # without --output, it goes when validate ends
    if as_json:
        print(json.dumps(zv.to_json(result, plan_file, run_dir if kept else None, trace), indent=2, allow_nan=False))
        return
    from zoplan.cli.render import validation_notes, validation_table

    out.print(validation_table(result, plan_file))
    for note in validation_notes(result, profiled=the_plan.profile is not None):
        out.print(Text(note))
    kept_at = f"run output: {run_dir}" if kept else ""
    shown = "; ".join(x for x in (kept_at, f"trace: {trace} (open in ui.perfetto.dev)" if trace else "") if x)
    if shown:
        out.print(Text(shown))


@app.command("replay")
def replay_cmd(
    base_model: str = typer.Argument(
        ...,
        help="the base weights the run started from (directory, hub id or tiny-*); alone, the run's "
        "journal.jsonl or directory, whose run.json names the base weights",
    ),
    journal: Optional[Path] = typer.Argument(None, help="the run's journal.jsonl (or the run's directory)"),
    output: Path = typer.Option(..., "--output", "-o", help="directory for the rebuilt weights"),
    dtype: Optional[Dtype] = typer.Option(
        None,
        "--dtype",
        help="replay and write a full run's weights in this dtype (default: each part as the run kept it, "
        "from plan.yaml; an adapter is replayed as it trained)",
    ),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (the device type that trained: bit-identical)"),
) -> None:
    """Rebuild trained weights from the base weights and the journal alone."""
    _needs_runtime("replay")
    from zoplan.runtime.journal import read_journal

    given: str | None = base_model
    if journal is None:  # `zoplan replay RUN`: the run's own record names its base weights
        journal, given = Path(base_model), None
    if journal.is_dir():
        journal = journal / "journal.jsonl"
    _check_node_zero(journal)
    # a damaged journal is refused before torch is imported (seconds); the replay reads it again
    # and says what it drops
    read_journal(journal, first=0, warn=False)
    if given is None:
        given = _base_of(journal)
    from zoplan.runtime.replay import replay_to

    steps = replay_to(given, journal, output, dtype=dtype.value if dtype else None, device=device, quiet=True)
    from zoplan.planfile import load_plan

    adapter = load_plan(journal.parent / "plan.yaml").tuning.to_tuning().frozen_base  # (replay_to read it)
    loads = "PeftModel.from_pretrained: an adapter" if adapter else "from_pretrained"
    out.print(Text(f"replayed {steps} steps into {output} ({loads})"))
    if steps == 0:  # (a run stopped before its first step, or a journal emptied)
        err.print(
            Text(f"warning: {journal} holds no step: {output} holds the base model, {given}, unchanged"),
            highlight=False,
            soft_wrap=True,
        )
    from zoplan.runtime.scratch import live_run_in

    pid = live_run_in(journal.parent)
    if pid is not None:  # the weights of a moment, not the run's
        err.print(
            Text(
                f"note: the run in {journal.parent} is training (pid {pid}): these are its weights after the {steps} "
                "steps its journal held when the replay read it"
            ),
            highlight=False,
            soft_wrap=True,
        )


def _check_node_zero(journal: Path) -> None:
    """A run over several machines keeps its journal on node 0: another node's directory has none."""
    from zoplan import runconfig

    record = journal.parent / runconfig.CONFIG_FILE
    if journal.exists() or not record.is_file():
        return
    try:
        cfg = runconfig.read(record)
    except ZoplanError:
        return
    if cfg.nnodes > 1 and cfg.node_rank != 0:
        raise ZoplanError(
            f"{journal.parent} is node {cfg.node_rank}'s output directory of a run over {cfg.nnodes} machines: "
            "node 0's holds the run's journal (and its trained model)",
            fix="replay node 0's output directory (or its journal.jsonl)",
        )


def _base_of(journal: Path) -> str:
    """The base weights a run started from, as the run.json beside its journal records them."""
    from zoplan import runconfig

    record = journal.parent / "run.json"
    if not record.is_file():
        raise ZoplanError(
            f"{record} does not exist: nothing says which base weights {journal} was trained from",
            fix=f"name them first: zoplan replay BASE_MODEL {journal} -o DIR",
        )
    return runconfig.read(record).model


@topo_app.command("list")
def topo_list() -> None:
    """The bundled machine topologies."""
    from zoplan.topology import bundled_names
    from zoplan.topology.view import topology_table

    out.print(topology_table(bundled_names()))


@topo_app.command("show")
def topo_show(name: str = typer.Argument(..., help="bundled topology name or YAML path")) -> None:
    """A machine as a tree: sockets, PCIe switches, GPUs and their bandwidths."""
    from zoplan.topology import load_topology
    from zoplan.topology.view import render_topology

    out.print(render_topology(load_topology(name)))


@topo_app.command("import")
def topo_import_cmd(
    source: Path = typer.Argument(..., help="a file holding the output of `nvidia-smi topo -m`"),
    gpu: Optional[str] = typer.Option(
        None,
        "--gpu",
        help="GPU preset: a100-sxm4-80gb, a100-sxm4-40gb, "
        "h100-sxm5-80gb, h100-pcie-80gb, h200-sxm-141gb, l40s-48gb, rtx4090-24gb",
    ),
    output: Path = typer.Option(..., "--output", "-o", help="the topology YAML file to write"),
    name: Optional[str] = typer.Option(None, "--name", help="the machine's name (default: the output file's stem)"),
    host_memory_gib: Optional[float] = typer.Option(
        None, "--host-memory-gib", help="REQUIRED: host memory per socket (NUMA node), GiB (`numactl -H`)"
    ),
    host_gbps: Optional[float] = typer.Option(
        None, "--host-gbps", help="host memory bandwidth per socket, GB/s (default: 204.8, with a warning)"
    ),
) -> None:
    """Write a topology file from the text of `nvidia-smi topo -m` (then: zoplan plan -t FILE)."""
    from zoplan.fileio import check_writable
    from zoplan.topology.importer import import_topology_file

    check_writable(output, "topology")  # (another file, a plan, was replaced without a word)
    result = import_topology_file(
        source, gpu=gpu, host_memory_gib=host_memory_gib, host_gbps=host_gbps, name=name or output.stem
    )
    result.write(output)
    for warning in result.warnings:
        err.print(Text(f"warning: {warning}"), highlight=False, soft_wrap=True)
    out.print(Text(f"wrote {output}: {result.summary()}"), highlight=False, soft_wrap=True)


@topo_app.command("detect")
def topo_detect_cmd(
    output: Path = typer.Option(Path("machine.yaml"), "--output", "-o", help="the topology YAML file to write"),
    name: Optional[str] = typer.Option(None, "--name", help="the machine's name (default: the output file's stem)"),
    host_gbps: Optional[float] = typer.Option(
        None,
        "--host-gbps",
        help="host memory bandwidth per socket, GB/s (default: an ASSUMED figure, marked in the file)",
    ),
    ranks: Optional[int] = typer.Option(None, "--ranks", help="CPU-only machines: CPU ranks (default: one per core)"),
    cpu: bool = typer.Option(False, "--cpu", help="describe the CPU only, even where nvidia-smi is present"),
) -> None:
    """Write a topology file for this machine: from nvidia-smi, or CPU ranks without a GPU."""
    from zoplan.fileio import check_writable
    from zoplan.topology.detect import detect

    check_writable(output, "topology")  # (another file, a plan, was replaced without a word)
    result = detect(ranks=ranks, host_gbps=host_gbps, name=name or output.stem, cpu_only=cpu)
    result.write(output)
    for warning in result.warnings:
        err.print(Text(f"warning: {warning}"), highlight=False, soft_wrap=True)
    out.print(
        Text(f"wrote {output}: {result.summary}  (then: zoplan plan -t {output})"), highlight=False, soft_wrap=True
    )


@models_app.command("list")
def models_list() -> None:
    """The model presets and their sizes."""
    from zoplan.cli.render import models_table

    out.print(models_table())


@recipes_app.command("list")
def recipes_list() -> None:
    """MeZO's task recipes: the records each reads, its prompt and label words, its lr, eps and batch
    (a run with `zoplan run --recipe NAME --tuning lora` or `prefix` takes MeZO's rates for that adapter)."""
    from zoplan.cli.render import recipes_table

    out.print(recipes_table())


def _empty_argument(argv: list[str]) -> ZoplanError | None:
    """An empty argument (``-o ""``, ``--data=``: what an unset shell variable gives) is a mistake
    whatever it stands for: as a path it would mean the current directory. None if there is none."""
    for i, arg in enumerate(argv):
        option, eq, value = arg.partition("=")
        if arg.startswith("--") and eq and not value.strip():
            name = option
        elif not arg.strip():
            name = argv[i - 1] if i and argv[i - 1].startswith("-") else "an argument"
        else:
            continue
        return ZoplanError(
            f"{name} is empty",
            fix="give it a value (a shell variable left unset gives an empty one), or leave the option out",
        )
    return None


def main(as_program: bool = False) -> None:
    """The ``zoplan`` command; ``as_program``: this process is the command (its entry points), which
    ends once the command has (called in-process, by a test, it leaves the signals as they were)."""
    try:
        empty = _empty_argument(sys.argv[1:])
        if empty is not None:
            raise empty
        app()
    except ZoplanError as exc:
        if as_program:
            _exiting()
        # messages quote user input (names, paths): print them literally, never as markup
        try:
            err.print(Text.assemble(("error:", "bold red"), " ", exc.message), highlight=False, soft_wrap=True)
            if exc.fix:
                err.print(Text(f"  fix: {exc.fix}"), highlight=False, soft_wrap=True)
        except KeyboardInterrupt:  # (a late stop signal: the status says what ended the command)
            pass
        sys.exit(exc.status)
    except KeyboardInterrupt:
        if as_program:
            _exiting()
        err.print("interrupted")
        sys.exit(130)
    except OSError as exc:
        import errno

        if exc.errno != errno.ENAMETOOLONG:
            raise
        # a path given is longer than the file system takes (wherever it is first used)
        name = str(exc.filename or "a path given")
        shown = name if len(name) <= 80 else f"{name[:40]}...{name[-30:]} ({len(name)} characters)"
        err.print(Text.assemble(("error:", "bold red"), " ", f"{shown}: the name is too long"), highlight=False)
        err.print(
            Text("  fix: use a shorter path (on Linux at most 255 bytes a name, 4096 a whole path)"), highlight=False
        )
        sys.exit(2)
    except SystemExit as exc:  # typer ends a command stopped by Ctrl-C so, without a word
        if exc.code == 130 and _by_ctrl_c(exc):
            err.print("interrupted")
        raise


def _exiting() -> None:
    """The command is ending with its status decided: a stop signal from now on changes nothing.
    One still pending from the stop being ended (a run stopped by SIGTERM before its first step)
    raised KeyboardInterrupt between the message and sys.exit, and the process died of SIGINT
    (status -2) instead of exiting 143 as it had said."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)


def _by_ctrl_c(exc: BaseException | None) -> bool:
    """Whether ``exc`` was raised while a Ctrl-C (KeyboardInterrupt) was handled, or for one."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False

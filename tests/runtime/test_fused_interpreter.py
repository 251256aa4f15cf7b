"""The GPU's fused perturbation kernels, checked on the CPU through Triton's interpreter.

The kernels of ``zoplan.runtime.perturb_triton`` normally run on CUDA only. With
``TRITON_INTERPRET=1`` Triton runs them on CPU tensors, and ``ZOPLAN_PERTURB_TRITON=cpu`` makes the
runtime use them there. That checks, without a GPU: the in-kernel key derivation against the
reference stream (bit for bit), the one-launch-per-block kernels against the per-parameter ones
(bit for bit), and a real ``zoplan run`` whose blocks are perturbed and updated by the kernels
(equal to the torch path up to float32 rounding: the interpreter's log/cos are numpy's).
Skipped where triton is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from zoplan.runtime.checkpoint import dtype_kwarg

torch = pytest.importorskip("torch")


def _triton_major() -> int:
    if importlib.util.find_spec("triton") is None:
        return 0
    import triton

    return int(triton.__version__.split(".")[0])


# (the runtime uses its kernels with triton 3 or newer only: zoplan.runtime.perturb._load_triton)
pytestmark = pytest.mark.skipif(_triton_major() < 3, reason="triton 3 or newer is not installed")

INTERP_ENV = {"TRITON_INTERPRET": "1", "ZOPLAN_PERTURB_TRITON": "cpu"}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_kernels_under_the_interpreter() -> None:
    here = Path(__file__).parent
    env = {**os.environ, **INTERP_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "test_block_kernels.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=here,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    # every test of the file runs under the interpreter: none may skip
    assert re.search(r"\b\d+ passed\b", proc.stdout) and "skipped" not in proc.stdout and "failed" not in proc.stdout


def test_a_run_with_the_fused_kernels_follows_the_torch_path(
    tiny_dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The losses at theta +- eps z and the projected gradients agree with the torch path's run;
    the weights agree with a replay of the run's own journal on the torch path. (Comparing the
    two runs' weights directly would be loose: the loss difference is an fp32 difference of two
    losses near 7, divided by 2 eps, so last-bit changes of z move g by ~1e-4.)"""
    from transformers import AutoModelForCausalLM

    from zoplan.runtime import rankserver
    from zoplan.runtime.launch import rank_env

    from .test_layouts import LR, cpu_topology, planned, train
    from zoplan.runtime.journal import read_journal
    from zoplan.runtime.replay import replay

    model_dir = tiny_dirs["tiny-opt"]
    two = cpu_topology(tmp_path, 2)
    # one compute rank and one relay, sliced: each rank updates its own slices of a block
    # (update_range over sub-ranges), then the compute rank perturbs the gathered block to both
    # signs in one launch (the single-sign and whole-block kernels are checked bit for bit
    # against the per-parameter ones by test_block_kernels.py, above)
    layouts = {
        "1x1-relay-sliced": dict(perturbation=1, data=1, gpus=("rank0",), upload="sliced", movers="all", slices=2)
    }
    steps = 2  # the second applies the first one's deferred update: every kernel runs (interpreted: slow)
    with monkeypatch.context() as m:  # the fused runs' supervisors: forked from a server that imported triton so
        for key, value in INTERP_ENV.items():
            m.setenv(key, value)
        server = rankserver.start(tmp_path / "interpreted.sock", ("opt",), env=rank_env(os.environ))
    fused: dict[str, dict[str, torch.Tensor]] = {}
    try:
        for name, pins in layouts.items():
            plan_path = planned(tmp_path, model_dir, two, name, **pins)
            with monkeypatch.context() as m:  # the reference: the torch path, not the CPU's compiled kernel
                m.setenv("ZOPLAN_Z_KERNEL", "torch")
                train(plan_path, model_dir, tmp_path / f"{name}-torch", steps=steps)
            with monkeypatch.context() as m:
                for key, value in {**INTERP_ENV, rankserver.SERVER_ENV: str(tmp_path / "interpreted.sock")}.items():
                    m.setenv(key, value)
                fused[name] = train(plan_path, model_dir, tmp_path / f"{name}-fused", steps=steps)
    finally:
        server.terminate()
        server.wait()
    for name in layouts:
        log = (tmp_path / f"{name}-fused" / "worker-node0.log").read_text()
        assert "perturbation kernels: triton interpreter, one launch per block" in log, log[-2000:]
        assert "perturbation kernels: torch" in (tmp_path / f"{name}-torch" / "worker-node0.log").read_text()

        ref_lines = _lines(tmp_path / f"{name}-torch" / "journal.jsonl")
        lines = _lines(tmp_path / f"{name}-fused" / "journal.jsonl")
        assert [r["step"] for r in lines] == [r["step"] for r in ref_lines] == list(range(steps))
        for r, ref in zip(lines, ref_lines):
            assert r["seed"] == ref["seed"]
            for key in ("loss_plus", "loss_minus"):
                assert r[key] == pytest.approx(ref[key], rel=1e-6), (name, r["step"], key)
            assert r["projected_grad"] == pytest.approx(ref["projected_grad"], rel=1e-3), (name, r["step"])
            assert r["lr"] == LR

        model = AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kwarg(torch.float32))
        replay(
            model, read_journal(tmp_path / f"{name}-fused" / "journal.jsonl")
        )  # the torch path, with the fused run's own projected gradients
        replayed = {n: p.detach() for n, p in model.named_parameters()}
        initial = AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kwarg(torch.float32)).state_dict()
        for pname, value in fused[name].items():
            if pname not in replayed:
                continue
            assert not torch.equal(value, initial[pname]), (name, pname)  # every parameter was trained
            # z differs by float32 rounding of log/cos: far below one update (lr * g * z ~ 1e-3)
            torch.testing.assert_close(value, replayed[pname], rtol=1e-5, atol=1e-7, msg=f"{name} {pname}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels run for real (test_block_kernels.py)")
def test_kernels_compile_for_the_gpu_with_the_per_parameter_kernels_arithmetic(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiles the block kernel for sm_90 (H100/H200) without a GPU: the interpreter accepts code
    the compiler would reject (integer widths, uint64 constants). In the PTX, the single-output
    variants must hold exactly the per-parameter kernel's rounded float operations (mul/add/sub.rn,
    and the FMAs inside libdevice's log/cos): the same arithmetic, so the same bits."""
    import re

    import triton

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this triton has no offline compile API")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if "zoplan.runtime.perturb_triton" in sys.modules and sys.modules["zoplan.runtime.perturb_triton"]._INTERPRET:
        pytest.skip("the kernels were imported under the interpreter in this process")
    from zoplan.runtime import perturb_triton as T

    def ops(fn, signature: dict, constexprs: dict) -> dict[str, int]:
        sig = {**signature, **{k: "constexpr" for k in constexprs}}
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        ptx = triton.compile(
            src, target=GPUTarget("cuda", 90, 32), options={"num_warps": T._NUM_WARPS, **T._OPTIONS}
        ).asm["ptx"]
        return {
            op: len(re.findall(rf"\b{re.escape(op)}\.f32\b", ptx)) for op in ("mul.rn", "add.rn", "sub.rn", "fma.rn")
        }

    scalars = {"alpha": "fp32", "lr": "fp32", "wd": "fp32"}
    for out, base in (("*bf16", "*fp32"), ("*fp32", "*fp32"), ("*bf16", "*bf16")):
        for mode, decay in ((T.MODE_PERTURBED, False), (T.MODE_UPDATE, True), (T.MODE_UPDATE, False)):
            y = base if mode == T.MODE_PERTURBED else out
            per_param = ops(
                T._zo_kernel,
                {
                    "x_ptr": out,
                    "y_ptr": y,
                    "n": "i64",
                    "lo_start": "i64",
                    "k0": "i64",
                    "k1": "i64",
                    "k2": "i64",
                    **scalars,
                },
                {"MODE": mode, "DECAY": decay, "PRECISE": True, "BLOCK": T._BLOCK},
            )
            block_sig = {
                "x_ptr": out,
                "y_ptr": y,
                "w_ptr": out,
                "table_ptr": "*i64",
                "nrows": "i32",
                "seed_lo": "i64",
                "seed_hi": "i64",
                "alpha2": "fp32",
                **scalars,
            }
            block = ops(
                T._zo_block_kernel,
                block_sig,
                {"MODE": mode, "TWO": False, "DECAY": decay, "PRECISE": True, "BLOCK": T._BLOCK, "ROWS": 16},
            )
            assert per_param["mul.rn"] > 0 and per_param["fma.rn"] > 0, per_param  # the pattern matches
            assert block == per_param, (out, base, mode, decay)
            if mode == T.MODE_PERTURBED:  # the second output: one more rounded multiply and add per element
                two = ops(
                    T._zo_block_kernel,
                    block_sig,
                    {"MODE": mode, "TWO": True, "DECAY": False, "PRECISE": True, "BLOCK": T._BLOCK, "ROWS": 16},
                )
                assert two["fma.rn"] == per_param["fma.rn"] and two["sub.rn"] == per_param["sub.rn"]
                assert two["mul.rn"] > per_param["mul.rn"] and two["add.rn"] > per_param["add.rn"]
    words = ops(
        T._zo_block_kernel,
        {
            "x_ptr": "*i32",
            "y_ptr": "*i32",
            "w_ptr": "*i32",
            "table_ptr": "*i64",
            "nrows": "i32",
            "seed_lo": "i64",
            "seed_hi": "i64",
            "alpha2": "fp32",
            **scalars,
        },
        {"MODE": T.MODE_WORDS, "TWO": False, "DECAY": False, "PRECISE": True, "BLOCK": T._BLOCK, "ROWS": 64},
    )
    assert words == {"mul.rn": 0, "add.rn": 0, "sub.rn": 0, "fma.rn": 0}

# Every pending GPU check, for a device session with a fixed time budget (times measured on one
# H200, 2026-11-26):
#   kernels   the perturbation kernels' unit tests on CUDA (test_perturb_triton.py,
#             test_block_kernels.py), then per-parameter against per-block launches
#             (bench/block_kernels.py)                                          ~1 min
#   replay    replay across devices (bench/gpu_replay.py, docs/results/reliability.md)   ~1.5 min
#   layouts   the GPU checks of the test suite (tests/runtime/test_gpu.py): single-GPU schedules
#             train bit-identical weights (whole blocks, 4 rounds, resident blocks with prefetch 2;
#             peak GPU memory within the plan's), replay on the GPU is bit-identical     ~2.5 min
#   fidelity  the fidelity run (bench/gpu_fidelity.sh, docs/results/fidelity.md)         ~4.5 min
#   speed     the offloaded step of the OPT-1.3B and 2.7B shapes against the transfer bound and
#             the same model in GPU memory, the offloaded step with CUDA graphs
#             (ZOPLAN_CUDA_GRAPHS=1), then ZO2's offloading schedule on the same model,
#             batch and hyperparameters (bench/runtime_gpu.py, docs/results/runtime-gpu.md; ZO2
#             only where .peers/zo2 and .whl/zo2 were carried)                 not yet timed: a call of its own
#   matmul    bf16 products over 64 to 8192 tokens at the OPT-1.3B and 2.7B block shapes, fitted to
#             the cost model's peak * M / (M + half) (bench/matmul_tokens.py): what a GPU
#             preset's tflops x matmul_efficiency and matmul_half_tokens (0 in every preset so far)
#             should be, for the uncalibrated prediction at small micro-batches (issue 18) ~20 s
#   loss      what the next-token loss holds at its peak (max_memory_allocated) beside the plan's
#             figure for it, bf16 and fp32, vocabularies of 32000 and 128256 (bench/loss_memory.py,
#             docs/results/runtime-cpu.md)                                          ~20 s
# Run from the repository root: OUT=dir bash bench/gpu_checks.sh [PART ...] (default: the first
# four, more than one device call allows under the timeouts below, so run `replay fidelity` and
# `kernels layouts` as two calls, and `speed` as a third; FIDELITY_TIMEOUT (s, default 360) bounds
# the fidelity run, SPEED_TIMEOUT (default 540) the speed run). A machine without pydantic or
# pytest and without network access takes wheels from .whl/ and .whl/pytest/ (pip download them
# elsewhere for its Python version; see gpu_fidelity.sh). A session's device time (15 minutes,
# the machine's start included) holds about two calls: the open issues' figures are `speed`
# (issue 23: the offloaded step against the transfer bound, eager and with CUDA graphs, and ZO2;
# it logs each figure as it comes, so a time limit keeps the first ones) and `matmul loss fidelity`
# (issue 18: the preset's matmul rate over few tokens, the loss's memory against the plan's, then
# the uncalibrated prediction against the measured step), before the checks of `kernels layouts replay`. For ZO2, before the call, here:
#   python -m bench.zo2_peer --wheels .whl/zo2 && mkdir -p .peers && cp -r ../shared/peers/zo2 .peers/
# .whl/ and .peers/ are ignored by git: name them in the device call's carry.
set -x
OUT=${OUT:-gpu-checks}  # a fresh folder per call: a second call on a warm machine needs another
PARTS=${*:-kernels replay layouts fidelity}
mkdir -p "$OUT"
if ! python3 -c "import pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
if ! python3 -c "import pytest" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site-pytest .whl/pytest/*.whl
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/site-pytest
fi
python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -2
export HF_HUB_OFFLINE=1
for part in $PARTS; do
  case $part in
    kernels)
      timeout 150 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_perturb_triton.py \
        tests/runtime/test_block_kernels.py 2>&1 | tail -15 | tee "$OUT/kernel-tests.txt"
      timeout 40 python3 -m bench.block_kernels --out "$OUT" 2>&1 | tail -8 | tee "$OUT/block-kernels.txt" ;;
    replay)
      timeout 150 python3 -m bench.gpu_replay --out "$OUT/replay" 2>&1 | tail -20 | tee "$OUT/replay.txt"; cp "$OUT/replay/gpu_replay.json" "$OUT/" 2>/dev/null ;;
    layouts)
      timeout 300 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_gpu.py 2>&1 | tail -12 | tee "$OUT/layouts.txt" ;;
    fidelity)
      FIDELITY_TIMEOUT=${FIDELITY_TIMEOUT:-360} OUT="$OUT/fidelity" bash bench/gpu_fidelity.sh ;;
    matmul)
      for h in 2048 2560; do
        timeout 60 python3 -m bench.matmul_tokens --device cuda --dtype bf16 --hidden $h 2>&1 | tee -a "$OUT/matmul-tokens.txt"
      done ;;
    speed)
      peer=()
      if [ -d .peers/zo2 ] && ls .whl/zo2/*.whl >/dev/null 2>&1; then  # ZO2's transformers, beside ours
        python3 -m pip install -q --no-index --no-deps --target /tmp/site-zo2 .whl/zo2/*.whl &&
          peer=(--zo2 .peers/zo2 --zo2-site /tmp/site-zo2)
      fi
      timeout ${SPEED_TIMEOUT:-540} python3 -m bench.runtime_gpu --out "$OUT/speed" --steps 6 --graphs "${peer[@]}" 2>&1 |
        tail -20 | tee "$OUT/speed.txt" ;;
    loss)
      for v in 32000 128256; do
        timeout 60 python3 -m bench.loss_memory --device cuda --vocab $v --micro-batch 1 4 8 2>&1 | tee -a "$OUT/loss-memory.txt"
      done ;;
    *) echo "unknown part: $part (kernels, replay, layouts, fidelity, speed, matmul, loss)"; exit 2 ;;
  esac
done

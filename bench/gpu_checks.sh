# Every pending GPU check in one run, for a device session with a fixed time budget (about 7 min):
#   1. the perturbation kernels' unit tests on CUDA (test_perturb_triton.py, test_block_kernels.py);
#   2. per-parameter against per-block kernel launches (bench/block_kernels.py);
#   3. replay across devices (bench/gpu_replay.py, docs/results/reliability.md);
#   4. the fidelity run (bench/gpu_fidelity.sh, docs/results/fidelity.md).
# Run from the repository root: OUT=dir bash bench/gpu_checks.sh. A machine without simpy, pydantic
# or pytest and without network access takes wheels from .whl/ and .whl/pytest/ (pip download them
# elsewhere for its Python version; see gpu_fidelity.sh).
set -x
OUT=${OUT:-gpu-checks}
mkdir -p "$OUT"
if ! python3 -c "import simpy, pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
if ! python3 -c "import pytest" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site-pytest .whl/pytest/*.whl
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/site-pytest
fi
python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -2
export HF_HUB_OFFLINE=1
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_perturb_triton.py \
  tests/runtime/test_block_kernels.py 2>&1 | tail -15 | tee "$OUT/kernel-tests.txt"
timeout 60 python3 bench/block_kernels.py --out "$OUT" 2>&1 | tail -8 | tee "$OUT/block-kernels.txt"
timeout 90 python3 bench/gpu_replay.py --out "$OUT/replay" 2>&1 | tail -20 | tee "$OUT/replay.txt"
OUT="$OUT/fidelity" bash bench/gpu_fidelity.sh

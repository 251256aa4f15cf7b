# GPU fidelity run (docs/results/fidelity.md): one GPU, OPT-1.3B- and 2.7B-shaped models.
# Run from the repository root on the GPU machine; results under $OUT (default ./gpu-fidelity).
# A machine without pydantic and without network access takes wheels from .whl/ (pip download
# them elsewhere for its Python version).
set -x
OUT=${OUT:-gpu-fidelity}
# a second pass on the same machine must not mix with the first: bench/fidelity.py appends to
# fidelity.txt, and the copies below merge into existing folders
if [ -e "$OUT/fidelity.txt" ]; then
  echo "$OUT holds an earlier fidelity run: give another OUT" >&2
  exit 2
fi
rm -rf /tmp/zoplan-fidelity  # this script's scratch (--work below)
mkdir -p "$OUT"
if ! python3 -c "import pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -2
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt"
zoplan topo detect -o "$OUT/machine.yaml" 2>&1 | tail -5
# 20 steps (FIDELITY_STEPS): on the H200 VM the 2.7B shape's uploads ran 9-27% slower in steps 1-3
# than from step 4 on (docs/results/fidelity.md); a median over 5 steps is mostly those
timeout ${FIDELITY_TIMEOUT:-420} python3 -m bench.fidelity --out "$OUT" --work /tmp/zoplan-fidelity --device cuda \
  --topology "$OUT/machine.yaml" --models opt-1.3b,opt-2.7b --layouts 1x1 \
  --batch 8 --micro-batch 8 --seq-len 256 --steps ${FIDELITY_STEPS:-20} 2>&1 | tail -40
cp /tmp/zoplan-fidelity/*.yaml /tmp/zoplan-fidelity/*trace.json "$OUT"/ 2>/dev/null
for run in /tmp/zoplan-fidelity/*-run; do  # spans (GPU and host time per stage) and the worker log
  mkdir -p "$OUT/$(basename "$run")" && cp "$run"/spans-rank*.jsonl "$run"/worker-node*.log "$OUT/$(basename "$run")"/
done
# the calibration's own timed steps (zoplan calibrate --spans), and their per-block compute: where
# a calibrated block time above the run's comes from
cp -r /tmp/zoplan-fidelity/*-calibration-spans "$OUT"/ 2>/dev/null
for kept in "$OUT"/*-calibration-spans/2x1/spans-rank0.jsonl; do
  [ -f "$kept" ] && echo "== $kept" && python3 -m bench.step_table "$kept" --blocks | tail -30
done
ls -la "$OUT"

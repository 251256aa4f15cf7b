#!/usr/bin/env bash
# The suite on the oldest versions zoplan says it supports: Python 3.10 and the lower bound of
# every library pyproject.toml asks for (bench/oldest.txt pins them; tests/test_readme.py keeps
# the two in step). CI runs the newest releases; this shows the lower bounds are true.
#
#   bash bench/oldest.sh [PYTHON] [PYTEST ARGS...]    (PYTHON: a Python 3.10 interpreter, default python3.10)
#
# It clones this checkout's HEAD into a temporary folder with a fresh virtual environment, installs
# the pinned versions (torch 2.1.0 from the package index is a CUDA build: about 2.5 GB of
# downloads, 5 GB on disk; triton, which the dev extra brings for the interpreter tests, is left
# out: torch 2.1 needs its own triton 2.1), runs the suite there and removes it all after.
# Results: docs/results/oldest.md.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3.10}
shift || true
work=$(mktemp -d /tmp/zoplan-oldest-XXXXXX)
trap 'rm -rf "$work"' EXIT
git clone -q . "$work/src"
"$python" -m venv "$work/venv"
pip=("$work/venv/bin/pip" install -q -c "$work/src/bench/oldest.txt")
"${pip[@]}" torch numpy
"${pip[@]}" -e "$work/src[runtime,trainer]" pytest pytest-xdist hypothesis matplotlib peft gguf
echo "versions:"
"$work/venv/bin/python" --version
"$work/venv/bin/pip" list 2>/dev/null | grep -E -i "^(torch|transformers|tokenizers|safetensors|pydantic|typer|click|rich|networkx|pyyaml|accelerate|peft) "
cd "$work/src"
PATH="$work/venv/bin:$PATH" "$work/venv/bin/python" -m pytest -q -n 2 --dist loadgroup -p no:cacheprovider "$@"

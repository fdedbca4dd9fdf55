#!/usr/bin/env bash
# One entry point for a fresh machine: builds .venv (torch, detectron2 v0.6, this package), then runs
#   bash run.sh test [pytest args]   the test suite (fast tests; add -m slow or -m "" for the rest)
#   bash run.sh demo [args]          a small ReSim pre-training on the embedded images (CPU is fine)
#   bash run.sh e2e [args]           pre-train, convert, fine-tune and evaluate end to end (CPU)
#   bash run.sh setup                only the environment
# RESIM_VENV picks another venv folder; PYTHON the interpreter that creates it (3.10+).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${RESIM_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp
  stamp="$VENV/.resim-setup-$(cat requirements.txt setup.py tools/install_detectron2.py | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    echo "[run.sh] installing requirements into $VENV (torch first: it is large)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "$(grep -E '^torch==' requirements.txt)" "$(grep -E '^torchvision==' requirements.txt)"
    "$VENV/bin/python" -m pip install -q -r requirements.txt
    "$VENV/bin/python" tools/install_detectron2.py
    "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
    rm -f "$VENV"/.resim-setup-*
    touch "$stamp"
  fi
}

cmd="${1:-test}"
shift || true
case "$cmd" in
  setup) setup ;;
  test) setup; exec "$VENV/bin/python" -m pytest tests "$@" ;;
  demo) setup; exec "$VENV/bin/python" tools/demo.py "$@" ;;
  e2e) setup; exec "$VENV/bin/python" tools/e2e_demo.py "$@" ;;
  *) echo "usage: bash run.sh {test|demo|e2e|setup} [args]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# One entry point for a fresh machine: builds .venv (torch, detectron2 v0.6, this package), then runs
#   bash run.sh test [pytest args]   the test suite (fast tests; add -m slow or -m "" for the rest);
#                                    with ../shared/third_party/detectron2-v0.6 beside the repo it
#                                    also adds the DensePose project from there, so its tests run
#   bash run.sh demo [args]          a small ReSim pre-training on the embedded images (CPU is fine)
#   bash run.sh e2e [args]           pre-train, convert, fine-tune and evaluate end to end (CPU)
#   bash run.sh setup                only the environment
#   bash run.sh setup --densepose [PATH]
#                                    ... plus detectron2's DensePose project (v0.6): PATH is its
#                                    projects/DensePose folder (a local copy works offline); without
#                                    PATH, ../shared/third_party's copy, else a clone of detectron2
#                                    v0.6. A .pth file in the venv names the folder; av and scipy
#                                    come from PyPI.
# RESIM_VENV picks another venv folder; PYTHON the interpreter that creates it (3.10+).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${RESIM_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
SHARED_DENSEPOSE="../shared/third_party/detectron2-v0.6/projects/DensePose"

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

# detectron2's DensePose project cannot be pip-installed from its folder alone (its setup.py reads
# detectron2's __init__.py two folders up, and its requirement would build detectron2 from
# source): put the folder on the venv's import path instead.
densepose() {
  local path="${1:-}"
  if [ -z "$path" ]; then
    if [ -d "$SHARED_DENSEPOSE" ]; then
      path="$SHARED_DENSEPOSE"
    else
      local clone="$VENV/src/detectron2-v0.6"
      if [ ! -d "$clone/projects/DensePose" ]; then
        echo "[run.sh] cloning detectron2 v0.6 for its DensePose project into $clone"
        git clone --quiet --depth 1 --branch v0.6 https://github.com/facebookresearch/detectron2 "$clone"
      fi
      path="$clone/projects/DensePose"
    fi
  fi
  if [ ! -f "$path/densepose/__init__.py" ]; then
    echo "[run.sh] $path is not detectron2's projects/DensePose folder (no densepose/__init__.py)" >&2
    exit 2
  fi
  path="$(cd "$path" && pwd)"
  local site pth
  site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  pth="$site/densepose_project.pth"
  if [ "$(cat "$pth" 2>/dev/null)" != "$path" ] || ! "$VENV/bin/python" -c "import av, scipy" 2>/dev/null; then
    echo "[run.sh] DensePose project: $path (named in $pth); installing av, scipy"
    echo "$path" > "$pth"
    "$VENV/bin/python" -m pip install -q av scipy
  fi
}

cmd="${1:-test}"
shift || true
case "$cmd" in
  setup)
    setup
    if [ "${1:-}" = "--densepose" ]; then densepose "${2:-}"; fi
    ;;
  test)
    setup
    if [ -d "$SHARED_DENSEPOSE" ]; then densepose "$SHARED_DENSEPOSE"; fi
    exec "$VENV/bin/python" -m pytest tests "$@"
    ;;
  demo) setup; exec "$VENV/bin/python" tools/demo.py "$@" ;;
  e2e) setup; exec "$VENV/bin/python" tools/e2e_demo.py "$@" ;;
  *) echo "usage: bash run.sh {test|demo|e2e|setup [--densepose [PATH]]} [args]" >&2; exit 2 ;;
esac

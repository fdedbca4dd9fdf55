#!/usr/bin/env bash
# Fill the git-ignored .carry/ folder with what benchmarks/device_check.sh needs on a GPU machine
# that has Python 3.12, torch and torchvision but no package index (see the device tool's README):
#
#   .carry/pb1-detectron2-0.6.tar.gz   detectron2 v0.6's Python sources (tools/install_detectron2.py)
#   .carry/*.whl                       a cp312 pycocotools wheel
#   .carry/site/                       pure-Python packages copied from this .venv (fvcore, iopath,
#                                      yacs, omegaconf, termcolor)
#   .carry/skimage_data/skimage/data/  the demo photographs alone, for the train_demo step (a
#                                      data-only stand-in: resim_d2 finds the folder, imports nothing)
#
# Run here, with this project's .venv active and PyPI reachable:  bash benchmarks/prepare_carry.sh
# Then on the device: run(command='STEPS="..." bash benchmarks/device_check.sh', carry=[".carry"]).
set -euo pipefail
CARRY="${CARRY:-.carry}"
PY="${PYTHON:-python}"
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir -p "$CARRY/site" "$CARRY/skimage_data/skimage/data"

for pkg in fvcore iopath yacs omegaconf termcolor; do
  [ -d "$SITE/$pkg" ] || { echo "prepare_carry: $pkg is not in $SITE (bash run.sh setup)"; exit 1; }
  rm -rf "${CARRY:?}/site/$pkg" && cp -r "$SITE/$pkg" "$CARRY/site/"
done
find "$CARRY/site" -name __pycache__ -prune -exec rm -rf {} +

"$PY" tools/install_detectron2.py --download-only "$CARRY"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$CARRY" pycocotools==2.0.11

# the photographs named in resim_d2/data/datasets.py (train and val)
names=$("$PY" -c "from resim_d2.data.datasets import DEMO_TRAIN_IMAGES as T, DEMO_VAL_IMAGES as V
print(' '.join(T + V))")
data=$("$PY" -c "from resim_d2.data.datasets import demo_images_dir; print(demo_images_dir())")
touch "$CARRY/skimage_data/skimage/__init__.py"
for n in $names; do cp "$data/$n" "$CARRY/skimage_data/skimage/data/"; done
du -sh "$CARRY"

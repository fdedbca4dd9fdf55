#!/usr/bin/env python
"""resim_d2: ReSim (Region Similarity Representation Learning) pre-training and transfer on
detectron2.

detectron2 itself is not listed in install_requires: PyPI serves no official detectron2
distribution.
Use a detectron2 you built, or `python tools/install_detectron2.py` (what `bash run.sh` does).
"""

from setuptools import find_packages, setup

setup(
    name="resim_d2",
    version="0.1.0",
    description="ReSim region-similarity self-supervised pre-training as a detectron2 extension",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["resim_d2", "resim_d2.*"]) + ["resim_d2.configs"],
    # The config tree lives at the top level (configs/) and ships inside the package.
    package_dir={"resim_d2.configs": "configs"},
    package_data={
        "resim_d2.configs": ["*.yaml", "*/*.yaml", "*/*/*.yaml"],
        "resim_d2.data": ["imagenet100.txt"],  # the IN-100 class list (CMC split)
    },
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "fvcore>=0.1.5,<0.1.6",
        "iopath>=0.1.7,<0.1.10",
        "pycocotools>=2.0.7",
        "opencv-python-headless>=4.8",
        "omegaconf>=2.1",
        "yacs>=0.1.8",
        "termcolor>=1.1",
        "tabulate",
        "cloudpickle",
        "tqdm>4.29.0",
        "tensorboard",
        "matplotlib",
        "scipy",
        "scikit-image>=0.22",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout"],
        # Cityscapes loader (polygons) and evaluation scripts
        "cityscapes": ["cityscapesscripts>=2.2", "shapely>=2.0"],
        # detectron2's DensePose project itself is not on PyPI: see `bash run.sh setup --densepose`
        "densepose": ["av", "scipy"],
    },
)

"""Build and install megalite, including the C++ extension ``megalite._C``.

``pip install .`` (or ``pip install -e .``) compiles every ``csrc/*.cpp`` into one pybind11
module with -O3 and C++17; nothing is compiled at run time.

Install ``torch==2.13.0`` (CPU build) first on machines without CUDA: a bare ``torch``
requirement with no torch installed pulls a multi-GB CUDA build.
"""
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext = Pybind11Extension(
    "megalite._C",
    sorted(glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(
    name="megalite",
    version="0.1.0",
    description="Megatron-style distributed pretraining for Transformer language models",
    packages=find_packages(include=["megalite", "megalite.*"]),
    package_data={"megalite": ["configs/*.yaml"]},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "numpy",
        "sentencepiece",
        "tokenizers",
        "pyyaml",
        "safetensors",  # checkpoint model files
        "orjson",  # 3x faster jsonl parsing in preprocessing (json still decides validity)
        # preprocess --split-sentences; pinned: another version may cut sentences elsewhere,
        # which changes the output bytes (megalite/dataprep/sentences.py)
        "sentencex==1.0.32",
    ],
    extras_require={
        "hf": ["transformers"],
        # --zero-stage; the ZeRO state map reads DeepSpeed's bookkeeping, tested with 0.19
        "zero": ["deepspeed>=0.19.8,<0.20"],
        "tensorboard": ["tensorboard"],
        # --wandb-project (Weights & Biases logging); the tests run it offline
        "wandb": ["wandb"],
        # megatron-core==0.16.1 is the tests' reference for the dataset indices and token files;
        # the Makefile installs it --no-deps (its datasets need only torch, numpy, packaging).
        "test": ["pytest", "pytest-timeout", "hypothesis", "transformers",
                 "deepspeed>=0.19.8,<0.20", "tensorboard", "packaging", "wandb"],
    },
    entry_points={"console_scripts": ["megalite=megalite.cli:main"]},
)

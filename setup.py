"""Install r4b_fast. See README.md for the two quick-start commands.

Triton kernels, CUDA sources and training loops live in their own folders inside the package
(r4b_fast/kernels, r4b_fast/csrc, r4b_fast/training), never at the repository root: a root folder named like a
PyPI package (transformers >= 5.25 imports the PyPI `kernels`) would shadow it when run from the root.
"""

from setuptools import find_packages, setup

setup(
    name="r4b_fast",
    version="0.1.0",
    description="Fused Triton/CUDA kernels and a lean trainer for R-4B bi-mode annealing and BPO",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["r4b_fast", "r4b_fast.*"]),
    package_data={"r4b_fast.csrc": ["*.cu", "*.cuh"], "r4b_fast.training": ["assets/annealed/*", "assets/*.md"]},
    # Lower bounds are versions CI tests (.ci/gpu-set.txt: transformers 5.17, datasets 4.7; triton 3.6 by the compile
    # check; torch 2.13, the oldest CPU wheel here). torch is pinned only in the README's command (the CPU wheel), so
    # GPU users keep the CUDA build they have. The README installs the exact tested set with -c constraints.txt.
    install_requires=[
        "torch>=2.13", "triton>=3.6", "transformers>=5.17", "datasets>=4.7", "filelock", "numpy", "safetensors", "tqdm",
        "matplotlib", "tensorboard", "pillow",
        "math-verify>=0.9",  # accuracy_reward's LaTeX / expression comparison (imported on first use only)
    ],
    # vLLM loads logits processors from this group; the module imports vLLM, so only vLLM ever imports it
    entry_points={"vllm.logits_processors": [
        "r4b_strict_modes = r4b_fast.integrations.vllm_strict:R4BStrictModesLogitsProcessor"]},
    extras_require={
        # liger-kernel: the fused-loss benchmark's peer (its chunked losses run on CPU too); it needs only torch and
        # triton, which are installed already.
        "dev": ["pytest>=8", "pytest-benchmark>=5", "hypothesis>=6.100", "ruff>=0.8", "liger-kernel>=0.8"],
        "flash-attn": ["flash-attn>=2.6"],
        "xformers": ["xformers>=0.0.28"],
        "liger": ["liger-kernel>=0.5"],
        # the TRL integration overrides GRPOTrainer methods (private ones too): pinned to the minor version tested
        "trl": ["trl>=1.16,<1.17"],
        # the verl integration registers with verl 0.9's registries and agent loop: pinned to the minor version
        # tested. verl's own pins (transformers<5.11, tensordict<=0.10) apply; CI installs it --no-deps (.ci/run).
        "verl": ["verl>=0.9.1,<0.10"],
    },
)

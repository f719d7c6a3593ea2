"""Install dancegrpo and its `dancegrpo` command.

Requirements here are deliberately loose; CI pins exact versions through constraints.txt.
"""
from setuptools import find_packages, setup

setup(
    name="dancegrpo",
    version="0.1.0",
    description="DanceGRPO: GRPO fine-tuning of diffusion models and rectified flows",
    python_requires=">=3.10",
    packages=find_packages(include=["dancegrpo", "dancegrpo.*"]),
    package_data={"dancegrpo": ["assets/**/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.11",
        "diffusers>=0.32",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.60",
        "numpy>=1.24",
        "pillow>=9",
        "matplotlib>=3.7",
        "tensorboard>=2.14",
        "accelerate>=0.30",  # diffusers loads large checkpoints lazily with it
        "transformers>=4.45",  # text encoders of the real generators, PickScore, VideoAlign
        "peft>=0.12",  # LoRA fine-tuning
        "nvtx>=0.2",  # named ranges for Nsight; no-ops without a profiler attached
    ],
    extras_require={
        # triton runs its kernels under the interpreter on a CPU (TRITON_INTERPRET=1) for tests
        "test": ["pytest>=8", "pytest-xdist>=3", "pytest-benchmark>=4", "triton>=3.0", "pybind11>=2.12"],
    },
    entry_points={"console_scripts": ["dancegrpo=dancegrpo.cli:main"]},
)

"""Install dancegrpo and its `dancegrpo` command.

Requirements here are deliberately loose; CI pins exact versions through constraints.txt.

The fused-op extensions (csrc/) are compiled against the installed torch, so torch must be
importable when this runs: install torch first, then this package with
`pip install --no-build-isolation ...` (scripts/setup_env.sh does). Without torch, or with
DANCEGRPO_BUILD_EXT=0, they are skipped and dancegrpo.ops uses its torch reference ops.
"""
import os
import runpy
import sys
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def _say(message: str) -> None:
    print(f"[dancegrpo setup] {message}", file=sys.stderr)


def fused_op_extensions():
    """(ext_modules, cmdclass) for the C++ CPU extension, and the CUDA one where it can build."""
    if os.environ.get("DANCEGRPO_BUILD_EXT", "1") == "0":
        _say("DANCEGRPO_BUILD_EXT=0: not building the fused-op extensions")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _say("torch is not importable at build time: skipping the C++/CUDA fused-op extensions (dancegrpo.ops "
             "falls back to torch). Install torch first and reinstall with pip --no-build-isolation to build them.")
        return [], {}
    build = runpy.run_path(str(HERE / "csrc" / "build.py"))
    rel = lambda paths: [os.path.relpath(p, HERE) for p in paths]  # noqa: E731  setuptools wants relative paths
    include_dirs = build["INCLUDE_DIRS"]  # absolute: the compiler runs in a build directory
    extensions = [cpp_extension.CppExtension(
        build["CPU_EXTENSION"], rel(build["cpu_sources"]()), include_dirs=include_dirs,
        extra_compile_args={"cxx": build["cpu_compile_args"]()}, extra_link_args=build["cpu_link_args"]())]
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        extensions.append(cpp_extension.CUDAExtension(
            build["CUDA_EXTENSION"], rel(build["cuda_sources"]()), include_dirs=include_dirs,
            extra_compile_args=build["cuda_compile_args"]()))
    else:
        _say(f"skipping the CUDA extension: torch {torch.__version__} is "
             f"{'a CPU build' if torch.version.cuda is None else 'a CUDA build, but nvcc (CUDA_HOME) was not found'}")
    return extensions, {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = fused_op_extensions()

setup(
    name="dancegrpo",
    version="0.1.0",
    description="DanceGRPO: GRPO fine-tuning of diffusion models and rectified flows",
    python_requires=">=3.10",
    license="Apache-2.0",
    # kernels/ (Triton) lives at the top of the repository and installs as dancegrpo.kernels
    packages=find_packages(include=["dancegrpo", "dancegrpo.*"]) + ["dancegrpo.kernels"],
    package_dir={"dancegrpo.kernels": "kernels"},
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
        "test": ["pytest>=8", "pytest-xdist>=3", "pytest-benchmark>=4", "triton>=3.0", "pybind11>=2.12", "av>=12"],
        # MP4 output of `dancegrpo sample` (PyAV bundles ffmpeg); without it videos are written as GIFs
        "video": ["av>=12"],
    },
    entry_points={"console_scripts": ["dancegrpo=dancegrpo.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

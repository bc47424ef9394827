"""Build rca_fast.

The Python package needs nothing compiled.  The extension ``rca_fast._C`` (``csrc/``) is built
when torch is importable at build time (``pip install --no-build-isolation -e .``): with its CUDA
sources when a CUDA toolkit is found (``CUDA_HOME``, ``TORCH_CUDA_ARCH_LIST``, ``MAX_JOBS`` are
honoured), with its CPU sources otherwise; ``RCA_FAST_SKIP_EXT=1`` skips it.
"""
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)  # csrc_build.py sits next to this file


def extensions():
    """(ext_modules, cmdclass) for rca_fast._C; empty when skipped or impossible."""
    if os.environ.get("RCA_FAST_SKIP_EXT", "0") == "1":
        print("rca_fast: RCA_FAST_SKIP_EXT=1, not building the extension rca_fast._C")
        return [], {}
    try:
        import torch  # noqa: F401
    except ImportError:  # `pip install .` builds in an isolated environment without torch
        print("rca_fast: torch is not importable at build time, not building the extension rca_fast._C "
              "(for it: pip install --no-build-isolation .)")
        return [], {}
    try:
        from csrc_build import extension_modules  # noqa: F401  (added with the extension)
    except ImportError:
        return [], {}
    return extension_modules(ROOT)


ext_modules, cmdclass = extensions()

setup(
    name="rca_fast",
    version="0.1.0",
    description="Regional Semantic Contrast and Aggregation (CVPR 2022) with fused Triton/CUDA kernels",
    python_requires=">=3.10",
    packages=["rca_fast", "rca_fast.ops", "rca_fast.ref", "rca_fast.model", "rca_fast.data",
              "rca_fast.kernels", "rca_fast.kernels.map", "rca_fast.kernels.nce",
              "rca_fast.kernels.attention", "rca_fast.profile", "rca_fast.segment", "rca_fast.train",
              "rca_fast.utils"],
    package_dir={"rca_fast.kernels": "kernels"},
    # Supported: torch 2.11 (the GPU machines': Triton 3.6) to 2.14 (Triton 3.8); CI tests both ends.
    # Triton comes with torch's Linux CUDA builds; the kernels need >= 3.6.
    install_requires=["torch>=2.11", "torchvision>=0.26", "triton>=3.6; platform_system == 'Linux'",
                      "numpy", "tqdm", "pillow"],
    extras_require={"test": ["pytest", "pytest-benchmark", "scikit-learn", "matplotlib", "ruff"],
                    "plots": ["matplotlib"],
                    # dense CRF of the public gen_labels step (python -m rca_fast.pseudo --refine crf);
                    # C++, built from source; --refine par needs nothing beyond torch
                    "crf": ["pydensecrf2"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

"""How setup.py builds the extension rca_fast._C (sources in csrc/).

``extension_modules(root)`` returns ``(ext_modules, cmdclass)``: a CUDAExtension with the CUDA
sources when a CUDA toolkit is found and torch is a CUDA build, a CppExtension with the CPU
sources otherwise.  Environment:

* ``CUDA_HOME`` -- the toolkit root.  When unset and ``nvcc`` on the PATH is a wrapper script
  (``exec /usr/local/cuda-X/bin/nvcc "$@"``), the root is read from the script.
* ``TORCH_CUDA_ARCH_LIST`` (e.g. ``9.0``) and ``MAX_JOBS`` -- read by torch.utils.cpp_extension.
  Unset or empty, the CUDA sources are built for ``DEFAULT_CUDA_ARCH_LIST`` ("8.0;9.0+PTX": sm_80 and
  sm_90 machine code plus sm_90 PTX, which newer GPUs JIT-compile), not torch's default (the visible
  GPUs' architectures: none on a build node or in a container build, where torch's
  ``_get_cuda_arch_flags`` then fails with an IndexError).  ``native`` keeps torch's choice.
* ``RCA_FAST_SKIP_EXT=1`` -- skip the extension (handled in setup.py);
  ``RCA_FAST_EXT_CPU_ONLY=1`` -- build the CPU sources only even when a toolkit is present.
"""
from __future__ import annotations

import os
import re
import shutil
import sys

CPU_SOURCES = ["csrc/ops.cpp", "csrc/module.cpp", "csrc/cpu/ema.cpp", "csrc/cpu/kmeans.cpp"]
CUDA_SOURCES = ["csrc/cuda/ema.cu", "csrc/cuda/kmeans.cu"]
# The architectures of a build that names none: A100 (sm_80) and H100/H200 (sm_90) machine code, and
# sm_90 PTX so that any later GPU can JIT-compile the kernels.  The same binary whatever machine
# builds it, with or without a GPU.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def cuda_arch_list(environ=None):
    """(arch list, True when it is the default) of a CUDA build: ``TORCH_CUDA_ARCH_LIST`` when set
    to something other than blanks, else ``DEFAULT_CUDA_ARCH_LIST``."""
    value = (os.environ if environ is None else environ).get("TORCH_CUDA_ARCH_LIST", "").strip()
    return (value, False) if value else (DEFAULT_CUDA_ARCH_LIST, True)


def find_cuda_home():
    """The CUDA toolkit root, or None: CUDA_HOME/CUDA_PATH, else the nvcc found on the PATH
    (following a wrapper script to the nvcc it runs)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = os.path.realpath(nvcc)
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):  # a wrapper script: the real compiler is the path it runs
            found = re.search(rb"(/[^\s\"']*/bin/nvcc)\b", head)
            if found:
                real = os.path.realpath(found.group(1).decode())
    except OSError:
        pass
    return os.path.dirname(os.path.dirname(real))


def extension_modules(root):
    """(ext_modules, cmdclass) for rca_fast._C; source paths are relative to ``root`` (setup.py's
    folder, the working directory of a build)."""
    cuda_home = find_cuda_home()
    want_cuda = os.environ.get("RCA_FAST_EXT_CPU_ONLY", "0") != "1"
    if cuda_home and want_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils import cpp_extension

    toolkit = cpp_extension.CUDA_HOME
    has_nvcc = bool(toolkit) and os.path.isfile(os.path.join(toolkit, "bin", "nvcc"))
    use_cuda = want_cuda and torch.version.cuda is not None and has_nvcc
    cxx = ["-O3", "-g0", "-ffp-contract=off"]  # no FMA contraction: the EMA is bit-exact by contract;
    # -g0 overrides the -g of Python's CFLAGS: debug info doubles the compile time
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")  # the CPU twin's k-means runs its restarts/problems in parallel
        link.append("-fopenmp")
    sources = list(CPU_SOURCES)
    if use_cuda:
        # torch.utils.cpp_extension reads the variable when it compiles the CUDA sources
        arch_list, is_default = cuda_arch_list()
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        cxx.append("-DRCA_FAST_WITH_CUDA")
        sources += CUDA_SOURCES
        nvcc = ["-O3", "-DRCA_FAST_WITH_CUDA", "-lineinfo"]
        ext = cpp_extension.CUDAExtension(
            "rca_fast._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link)
        what = (f"with CUDA sources (toolkit {toolkit}, TORCH_CUDA_ARCH_LIST={arch_list}"
                + (", rca_fast's default: the variable is unset)" if is_default else ")"))
    else:
        ext = cpp_extension.CppExtension(
            "rca_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
        why = ("RCA_FAST_EXT_CPU_ONLY=1" if not want_cuda else
               "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit found (set "
                                                                         "CUDA_HOME)")
        what = f"with CPU sources only ({why})"
    print(f"rca_fast: building the extension rca_fast._C {what}")
    cmd = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": cmd}

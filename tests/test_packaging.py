"""Packaging: setup.py installs every package folder, and builds without torch at build time
(``pip install .`` runs setup.py in an isolated environment holding only setuptools and wheel); its
declared minimum torch / Triton is the stack CI tests; a CUDA build with no TORCH_CUDA_ARCH_LIST
(and no GPU to take the archs from) uses the documented default arch list."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# runs setup.py with torch unimportable and prints the packages it would install
_PROBE = r"""
import sys, setuptools
sys.modules["torch"] = None
seen = {}
setuptools.setup = lambda **kw: seen.update(kw)
sys.argv = ["setup.py"]
__file__ = "setup.py"
exec(compile(open("setup.py").read(), "setup.py", "exec"))
print("PACKAGES", " ".join(seen["packages"]), "EXT", len(seen["ext_modules"]))
print("REQUIRES", "|".join(seen["install_requires"]))
"""


def _setup_probe():
    env = dict(os.environ)
    env.pop("RCA_FAST_SKIP_EXT", None)
    res = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    return res


def test_setup_runs_without_torch_and_lists_every_package():
    res = _setup_probe()
    line = next(l for l in res.stdout.splitlines() if l.startswith("PACKAGES"))
    packages = set(line.split()[1:line.split().index("EXT")])
    assert line.split()[-1] == "0", "no extension without torch"
    folders = set()
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, "rca_fast")):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        if any(f.endswith(".py") for f in filenames):
            folders.add(os.path.relpath(dirpath, ROOT).replace(os.sep, "."))
    # the top-level kernels/ folder and its op folders, installed under rca_fast.kernels
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, "kernels")):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        if any(f.endswith(".py") for f in filenames):
            folders.add("rca_fast." + os.path.relpath(dirpath, ROOT).replace(os.sep, "."))
    assert {"rca_fast.kernels", "rca_fast.kernels.map", "rca_fast.kernels.nce"} <= folders
    assert folders <= packages, f"not installed: {sorted(folders - packages)}"


def test_declared_minimum_versions_are_the_stack_ci_tests():
    """setup.py's lower bounds for torch, torchvision and Triton are the versions .ci/run's second
    environment installs (the GPU machines' stack), so the oldest declared stack is the one tested."""
    res = _setup_probe()
    line = next(l for l in res.stdout.splitlines() if l.startswith("REQUIRES "))
    minimum = {}
    for req in line[len("REQUIRES "):].split("|"):
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", req.split(";")[0])
        if m:
            minimum[m.group(1)] = m.group(2)
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        pinned = dict(re.findall(r"\b(torch|torchvision|triton)==([0-9.]+)", f.read()))
    assert set(pinned) == {"torch", "torchvision", "triton"}, pinned
    for name, version in pinned.items():
        assert name in minimum, f"setup.py declares no lower bound for {name}: {line}"
        assert version.split(".")[:2] == minimum[name].split(".")[:2], \
            f"{name}: .ci/run tests {version}, setup.py declares >= {minimum[name]}"


# builds csrc_build's extension (no compile) with a stand-in toolkit and prints the nvcc arch flags
# torch would compile the CUDA sources with
_ARCH_PROBE = r"""
import os, sys
sys.path.insert(0, os.getcwd())
import torch
if torch.version.cuda is None:
    print("CPU-BUILD"); sys.exit(0)
import csrc_build
(ext,), _ = csrc_build.extension_modules(os.getcwd())
from torch.utils import cpp_extension
print("SOURCES", " ".join(ext.sources))
print("ARCHLIST", os.environ.get("TORCH_CUDA_ARCH_LIST"))
print("FLAGS", " ".join(cpp_extension._get_cuda_arch_flags()))
"""


def _arch_probe(tmp_path, arch_list):
    """(arch list, nvcc arch flags) of a CUDA build whose toolkit is a stand-in nvcc in tmp_path,
    with no visible GPU and TORCH_CUDA_ARCH_LIST unset (arch_list None) or set."""
    toolkit = tmp_path / "cuda"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\nexit 1\n")
    (toolkit / "bin" / "nvcc").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "CUDA_PATH",
                                                           "RCA_FAST_EXT_CPU_ONLY")}
    env.update(CUDA_HOME=str(toolkit), CUDA_VISIBLE_DEVICES="")
    if arch_list is not None:
        env["TORCH_CUDA_ARCH_LIST"] = arch_list
    res = subprocess.run([sys.executable, "-c", _ARCH_PROBE], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    if "CPU-BUILD" in res.stdout:
        pytest.skip("torch is a CPU build: the extension has no CUDA sources")
    out = {line.split()[0]: line.split()[1:] for line in res.stdout.splitlines()
           if line.split() and line.split()[0] in ("SOURCES", "ARCHLIST", "FLAGS")}
    assert any(s.endswith(".cu") for s in out["SOURCES"]), out
    return out["ARCHLIST"][0], set(out["FLAGS"])


def test_cuda_arch_list_defaults_to_sm80_sm90_ptx_when_unset(tmp_path):
    """A toolkit, no GPU, TORCH_CUDA_ARCH_LIST unset: torch alone picks the visible GPUs' archs (none:
    IndexError); the build must use the documented default, sm_80 + sm_90 SASS and sm_90 PTX."""
    arch_list, flags = _arch_probe(tmp_path, None)
    assert arch_list == "8.0;9.0+PTX"
    assert flags == {"-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                     "-gencode=arch=compute_90,code=compute_90"}, flags


def test_cuda_arch_list_set_is_honoured(tmp_path):
    arch_list, flags = _arch_probe(tmp_path, "9.0")
    assert arch_list == "9.0"
    assert flags == {"-gencode=arch=compute_90,code=sm_90"}, flags


def test_cuda_arch_list_blank_means_default():
    sys.path.insert(0, ROOT)
    try:
        import csrc_build
    finally:
        sys.path.remove(ROOT)
    assert csrc_build.cuda_arch_list({}) == ("8.0;9.0+PTX", True)
    assert csrc_build.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "  "}) == ("8.0;9.0+PTX", True)
    assert csrc_build.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "8.6+PTX"}) == ("8.6+PTX", False)

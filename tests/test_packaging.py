"""Packaging: setup.py installs every package folder, and builds without torch at build time
(``pip install .`` runs setup.py in an isolated environment holding only setuptools and wheel)."""
import os
import subprocess
import sys

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
"""


def test_setup_runs_without_torch_and_lists_every_package():
    env = dict(os.environ)
    env.pop("RCA_FAST_SKIP_EXT", None)
    res = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
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

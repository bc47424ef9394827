"""The package's layering, read from the source (every rule of DESIGN §4, lazy imports inside
functions included: a lazy import still ties the modules together):

* programs -> training (rca_fast.train) -> model -> ops -> (ref | kernels | extension), each layer importing
  nothing above it: the ops know nothing of the model; kernels nothing of ops, model or programs;
  ref (the oracle) nothing of what it checks; utils and data nothing of the model or the programs;
* no program imports another program (shared factories live in model/, data/, utils/, train/);
* programs reach the kernels only through rca_fast.ops, whose dispatcher alone picks a provider;
* kernels/ is grouped by op; the profiler's modules import each other without a cycle;
* ``import rca_fast.ref.map`` loads neither the dispatcher nor the model.
"""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "rca_fast")


def imported_modules(path, package):
    """Absolute names of every module ``path`` imports (top level or inside functions);
    ``package`` is the dotted package of the file, to resolve relative imports."""
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            names.append(mod)
            names += [f"{mod}.{a.name}" for a in node.names]   # `from . import step_mode`
    return names


def modules_of(folder, package):
    return {f"{package}.{name[:-3]}": os.path.join(folder, name)
            for name in sorted(os.listdir(folder)) if name.endswith(".py")}


def test_utils_import_nothing_of_data():
    utils = modules_of(os.path.join(ROOT, "utils"), "rca_fast.utils")
    assert utils
    for module, path in utils.items():
        bad = [n for n in imported_modules(path, "rca_fast.utils")
               if n == "rca_fast.data" or n.startswith("rca_fast.data.")]
        assert not bad, f"{module} imports {bad}: rca_fast.utils must not import rca_fast.data"


def test_profile_modules_have_no_import_cycle():
    modules = modules_of(os.path.join(ROOT, "profile"), "rca_fast.profile")
    graph = {m: sorted({n for n in imported_modules(p, "rca_fast.profile") if n in modules} - {m})
             for m, p in modules.items()}
    assert "rca_fast.profile.step_mode" in graph["rca_fast.profile.cli"]   # the walk sees lazy imports

    def cycle_from(start, node, path):
        for nxt in graph[node]:
            if nxt == start:
                return path + [nxt]
            if nxt not in path:
                found = cycle_from(start, nxt, path + [nxt])
                if found:
                    return found
        return None

    for module in graph:
        cycle = cycle_from(module, module, [module])
        assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("name,package,text,want", [
    ("a.py", "rca_fast.utils", "from ..data.transforms import x", "rca_fast.data.transforms"),
    ("b.py", "rca_fast.profile", "def f():\n    from .cli import y", "rca_fast.profile.cli"),
])
def test_import_reader_resolves_relative_and_lazy_imports(tmp_path, name, package, text, want):
    (tmp_path / name).write_text(text)
    assert want in imported_modules(str(tmp_path / name), package)


KERNELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels")
SHARED_KERNEL_HELPERS = {"__init__.py", "launch_rule.py", "precise_math.py", "compile_specs.py",
                         "offline_compile.py", "fixed_rule.py"}


def _package_files(folder, package):
    """{module name: path} of every .py file under ``folder`` (subfolders as subpackages)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        rel = os.path.relpath(dirpath, folder)
        pkg = package if rel == "." else package + "." + rel.replace(os.sep, ".")
        for name in filenames:
            if name.endswith(".py"):
                mod = pkg if name == "__init__.py" else f"{pkg}.{name[:-3]}"
                out[mod] = (os.path.join(dirpath, name), pkg)
    return out


def test_kernels_are_grouped_by_op():
    """kernels/ holds one folder per op (forward, backward, tiles) and, beside them, only the shared
    launch / maths / compile-check helpers: no op's file at the top level."""
    top = {n for n in os.listdir(KERNELS) if n.endswith(".py")}
    assert top <= SHARED_KERNEL_HELPERS, \
        f"op files at the top of kernels/: {sorted(top - SHARED_KERNEL_HELPERS)}"
    for op in ("map", "nce", "attention"):
        files = set(os.listdir(os.path.join(KERNELS, op)))
        assert {"__init__.py", "forward.py", "backward.py", "tiles.py"} <= files, (op, sorted(files))


@pytest.mark.parametrize("folder,package,forbidden", [
    # ... nor another provider: a kernel that called rca_fast.ref would be a fallback behind the
    # dispatcher's back (backend_for would name triton for a call the reference runs)
    (KERNELS, "rca_fast.kernels", ("rca_fast.model", "rca_fast.train", "rca_fast.infer", "rca_fast.evaluate",
                                   "rca_fast.data", "rca_fast.ops", "rca_fast.profile", "rca_fast.ref",
                                   "rca_fast._ext")),
    (os.path.join(ROOT, "ref"), "rca_fast.ref", ("rca_fast.ops", "rca_fast.kernels")),
])
def test_lower_layers_import_nothing_above_them(folder, package, forbidden):
    """kernels import nothing of the ops, model, programs or other providers; ref (the oracle)
    nothing of ops or kernels."""
    files = _package_files(folder, package)
    assert files
    for module, (path, pkg) in files.items():
        bad = [n for n in imported_modules(path, pkg)
               if any(n == f or n.startswith(f + ".") for f in forbidden)]
        assert not bad, f"{module} imports {bad}"


# ------------------------------------------------------------------ DESIGN §4's one-way layering
# programs -> training (rca_fast.train, the package; its program is rca_fast/train/__main__.py)
# -> model -> ops -> (ref | kernels | extension); every rule below is read
# from the import statements of the source (lazy imports inside functions count).
REPO = os.path.dirname(ROOT)
BENCHMARKS = os.path.join(REPO, "benchmarks")
# The programs (``python -m ...`` / ``python benchmarks/...``), each with the modules it is made of.
# A program may use the shared layers and its own modules, never another program's.
PROFILE_PROGRAM = {"rca_fast.profile.__main__", "rca_fast.profile.cli", "rca_fast.profile.ops_mode",
                   "rca_fast.profile.step_mode", "rca_fast.profile.compile_mode"}
PROGRAMS = {"rca_fast.train": {"rca_fast.train.__main__"}, "rca_fast.infer": {"rca_fast.infer"},
            "rca_fast.evaluate": {"rca_fast.evaluate"}, "rca_fast.pretrain": {"rca_fast.pretrain"},
            "rca_fast.pseudo": {"rca_fast.pseudo"}, "rca_fast.data": {"rca_fast.data.__main__"},
            "rca_fast.profile": PROFILE_PROGRAM,
            # step 3 of the workflow: its own trainer and predictor, used by no other program
            "rca_fast.segment": {"rca_fast.segment", "rca_fast.segment.__main__", "rca_fast.segment.args",
                                 "rca_fast.segment.trainer", "rca_fast.segment.predict"}}
PROGRAM_MODULES = set().union(*PROGRAMS.values())
PROVIDERS = ("rca_fast.ref", "rca_fast.kernels", "rca_fast._ext", "rca_fast.ops._dispatch")
PROGS = tuple(sorted(PROGRAM_MODULES))   # forbidden below the programs (rca_fast.profile's CLI, ...)


def _within(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def package_modules():
    """{module: (path, package)} of rca_fast (kernels/ under its installed name)."""
    files = _package_files(ROOT, "rca_fast")
    files.update(_package_files(KERNELS, "rca_fast.kernels"))
    return files


def benchmark_programs():
    """{module: (path, package)} of benchmarks/*.py: each one a program (harness and conftest are
    their shared helpers)."""
    return {f"benchmarks.{n[:-3]}": (os.path.join(BENCHMARKS, n), "benchmarks")
            for n in sorted(os.listdir(BENCHMARKS)) if n.endswith(".py") and n not in ("harness.py",
                                                                                       "conftest.py")}


def imports_of(module, files):
    path, pkg = files[module]
    # a package's __init__ resolves `from . import x` inside itself
    return imported_modules(path, module if path.endswith("__init__.py") else pkg)


def has_main_guard(path):
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    for node in tree.body:
        test = ast.unparse(node.test) if isinstance(node, ast.If) else ""
        if "__main__" in test and "__name__" in test:
            return True
    return False


def test_program_list_is_complete():
    """Every module run as a program (a __main__ guard or a __main__.py) is listed in PROGRAMS, so
    the rule below cannot miss a new one; every listed module exists."""
    files = package_modules()
    runnable = {m for m, (p, _) in files.items() if p.endswith("__main__.py") or has_main_guard(p)}
    missing = sorted(runnable - PROGRAM_MODULES)
    assert not missing, f"programs missing from PROGRAMS: {missing}"
    assert PROGRAM_MODULES <= set(files), sorted(PROGRAM_MODULES - set(files))


def test_no_program_imports_another_program():
    """Shared factories live in model/, data/, utils/ or train/: a program imports only those and
    its own modules (benchmarks/ programs included: none imports rca_fast.train or the profiler's CLI)."""
    files = package_modules()
    owner = {m: prog for prog, mods in PROGRAMS.items() for m in mods}
    for module in sorted(PROGRAM_MODULES):
        others = PROGRAM_MODULES - PROGRAMS[owner[module]]
        bad = [n for n in imports_of(module, files) if n in others]
        assert not bad, f"program {module} imports another program's module(s) {bad}"
    for module, (path, pkg) in benchmark_programs().items():
        bad = [n for n in imported_modules(path, pkg) if n in PROGRAM_MODULES]
        assert not bad, f"{module} imports the program module(s) {bad}"


@pytest.mark.parametrize("layer,forbidden", [
    # the ops know nothing of the model, the training loop, the data, the helpers or the programs
    ("rca_fast.ops", ("rca_fast.model", "rca_fast.train", "rca_fast.data", "rca_fast.utils",
                      "rca_fast.profile", "rca_fast.distributed") + PROGS),
    # the model reaches the kernels only through rca_fast.ops (the dispatcher alone picks a provider)
    ("rca_fast.model", ("rca_fast.train", "rca_fast.data", "rca_fast.profile") + PROVIDERS + PROGS),
    # the training loop: above the model, below the programs, and through ops too
    ("rca_fast.train", ("rca_fast.profile",) + PROVIDERS + PROGS),
    # the shared helpers and the data: no model, no training loop, no program, no provider
    ("rca_fast.utils", ("rca_fast.model", "rca_fast.train", "rca_fast.data", "rca_fast.ops",
                        "rca_fast.profile") + PROVIDERS + PROGS),
    ("rca_fast.data", ("rca_fast.model", "rca_fast.train", "rca_fast.ops", "rca_fast.profile")
     + PROVIDERS + PROGS),
    # the oracle depends on nothing it checks: torch and itself only
    ("rca_fast.ref", ("rca_fast.ops", "rca_fast.kernels", "rca_fast._ext", "rca_fast.model",
                      "rca_fast.train", "rca_fast.data", "rca_fast.utils", "rca_fast.profile")
     + PROGS),
    # the providers: nothing of ops, model or programs (the extension's wrapper as the kernels), nor
    # another provider (no fallback behind the dispatcher's back)
    ("rca_fast._ext", ("rca_fast.ops", "rca_fast.model", "rca_fast.train", "rca_fast.data",
                       "rca_fast.utils", "rca_fast.profile", "rca_fast.ref", "rca_fast.kernels") + PROGS),
])
def test_layer_imports_nothing_above_it(layer, forbidden):
    files = package_modules()
    modules = [m for m in files if _within(m, (layer,)) and m not in PROGRAM_MODULES]
    assert modules, layer
    for module in modules:
        bad = [n for n in imports_of(module, files) if _within(n, forbidden) and not _within(n, (layer,))]
        assert not bad, f"{module} imports {bad}: {layer} must not depend on them"


def test_programs_reach_the_kernels_through_ops():
    """Programs other than the profiler (which times each provider on purpose) call rca_fast.ops,
    never a provider or the dispatcher's internals: `backend_for` then names what really runs."""
    files = package_modules()
    for module in sorted(PROGRAM_MODULES - PROFILE_PROGRAM):
        bad = [n for n in imports_of(module, files) if _within(n, PROVIDERS)]
        assert not bad, f"{module} imports provider(s) {bad}"


def test_import_of_the_oracle_loads_neither_dispatcher_nor_model():
    """`import rca_fast.ref.map` in a fresh interpreter: the package's lazy attributes keep
    rca_fast.ops._dispatch and rca_fast.model unloaded until they are used."""
    code = ("import sys, rca_fast.ref.map\n"
            "loaded = sorted(m for m in sys.modules if m.startswith(('rca_fast.ops', 'rca_fast.model', "
            "'torchvision')))\n"
            "assert not loaded, loaded\n"
            "import rca_fast\n"
            "assert rca_fast.MemoryBank.__name__ == 'MemoryBank' and callable(rca_fast.ops.backend_for)\n"
            "assert 'rca_fast.ops._dispatch' in sys.modules and 'rca_fast.model.memory_bank' in sys.modules\n"
            "assert rca_fast.RCAModel.__name__ == 'RCAModel' and 'ops' in dir(rca_fast)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]

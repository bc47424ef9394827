"""The package's layering, read from the source: rca_fast.utils imports nothing of rca_fast.data
(utils sit below data), and the profiler's modules import each other without a cycle (lazy
imports inside functions count: a cycle still ties the modules together)."""
import ast
import os

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
    assert top <= SHARED_KERNEL_HELPERS, f"op files at the top of kernels/: {sorted(top - SHARED_KERNEL_HELPERS)}"
    for op in ("map", "nce", "attention"):
        files = set(os.listdir(os.path.join(KERNELS, op)))
        assert {"__init__.py", "forward.py", "backward.py", "tiles.py"} <= files, (op, sorted(files))


@pytest.mark.parametrize("folder,package,forbidden", [
    (KERNELS, "rca_fast.kernels", ("rca_fast.model", "rca_fast.train", "rca_fast.infer", "rca_fast.evaluate",
                                   "rca_fast.data", "rca_fast.ops", "rca_fast.profile")),
    (os.path.join(ROOT, "ref"), "rca_fast.ref", ("rca_fast.ops", "rca_fast.kernels")),
])
def test_lower_layers_import_nothing_above_them(folder, package, forbidden):
    """kernels import nothing of the ops, model or programs; ref (the oracle) nothing of ops or kernels."""
    files = _package_files(folder, package)
    assert files
    for module, (path, pkg) in files.items():
        bad = [n for n in imported_modules(path, pkg)
               if any(n == f or n.startswith(f + ".") for f in forbidden)]
        assert not bad, f"{module} imports {bad}"

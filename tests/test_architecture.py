"""The package's structure: the layer table of allowed imports, an acyclic import graph, no reach into the
repository (examples/, benchmarks/, paths), the public names, the README's Python blocks, the generated
docs/api.md, and a wheel install."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path
from typing import NamedTuple

import pytest

import pyro_vits

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(pyro_vits.__file__).parent
TOP = PACKAGE / "__init__.py"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}

# --------------------------------------------------------------------------- the layer table
# Each layer is a package (the package and all its modules) or a single module. A layer may import itself, the
# leaves, and the layers its row names, nothing else of pyro_vits (module-level, in-function and string
# imports alike). Every module belongs to exactly one layer: a new module or package needs a row here.
LEAVES = frozenset({"_validate", "_masks", "_device", "_configfile", "_arviz_compat", "_rundir", "_io"})
BELOW_APPS = frozenset({"nn", "flows", "distributions", "data", "kl", "infer", "models", "vits", "train",
                        "plots", "audit", "bench"})
LAYERS: dict[str, frozenset[str]] = {
    **{leaf: frozenset() for leaf in LEAVES},
    "nn": frozenset(),
    "flows": frozenset({"nn"}),
    "distributions": frozenset({"flows", "nn"}),
    "data": frozenset(),
    "kl": frozenset({"distributions", "flows", "nn"}),
    "infer": frozenset({"data", "distributions", "flows", "nn", "kl"}),
    "models": frozenset({"nn", "flows", "distributions", "data"}),
    "vits": frozenset({"models", "nn", "flows", "data", "distributions"}),
    "train": frozenset({"infer", "models", "data", "vits", "distributions", "flows", "nn"}),
    "plots": frozenset({"kl", "distributions", "flows", "nn"}),
    "audit": frozenset({"vits", "kl", "distributions", "data", "nn", "plots", "infer", "flows", "models"}),
    "studies": BELOW_APPS,
    "bench": frozenset({"models", "infer", "flows", "distributions", "data", "kl", "nn"}),
    "apps": BELOW_APPS | {"studies"},
    "cli": frozenset({"apps"}),
}
"""layer -> the layers it may import, besides itself and the leaves (``pyro_vits.<layer>`` and its modules).
The top-level ``pyro_vits/__init__.py`` (the public names, loaded lazily by name) is no layer: nothing in
the package imports it, and its table's targets are checked to exist."""


def layer_of(module: str) -> str | None:
    """The row of ``LAYERS`` that ``module`` belongs to (None for the top-level ``pyro_vits``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "pyro_vits" else None


def layers_containing(module: str) -> list[str]:
    return [row for row in LAYERS if module == f"pyro_vits.{row}" or module.startswith(f"pyro_vits.{row}.")]


class Import(NamedTuple):
    target: str  # a pyro_vits module (or another top-level module), or "pyro_vits" for its public names
    line: int
    kind: str  # "module" (runs at import), "function" (lazy), "string" (a module named in a string constant)
    type_only: bool = False  # inside ``if TYPE_CHECKING``


def _type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def _is_module_string(node: ast.AST) -> bool:
    return (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in MODULES
            and node.value != "pyro_vits")


def _call_name(node: ast.Call) -> str:
    return ast.unparse(node.func).rpartition(".")[2]


def imports(path: Path, source: str | None = None) -> list[Import]:
    """Every import in ``path``: module-level, inside functions (lazy), under ``if TYPE_CHECKING`` (flagged),
    and string imports: a constant naming a pyro_vits module (``importlib.import_module("pyro_vits.x")``, the
    command table of ``cli``), logger names aside. Only the top-level ``pyro_vits/__init__.py``'s
    ``__getattr__`` and its public-name table ``_EXPORTS`` are skipped (checked by
    :func:`test_public_name_table_targets`).
    ``from pyro_vits import NAME`` of a public name (not a module) is reported as target ``pyro_vits``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []
    tree = ast.parse(path.read_text() if source is None else source)
    loggers = {id(arg) for node in ast.walk(tree)
               if isinstance(node, ast.Call) and _call_name(node) == "getLogger" for arg in node.args}

    def visit(node: ast.AST, kind: str, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                visit(child, kind, True)
                continue
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if path == TOP and node is tree and child.name == "__getattr__":
                    continue
                visit(child, "function" if kind == "module" else kind, type_only)
                continue
            if path == TOP and node is tree and isinstance(child, ast.AnnAssign | ast.Assign) and \
                    "_EXPORTS" in ast.unparse(child).partition("=")[0]:
                continue  # the public-name table: its targets are checked on their own
            if isinstance(child, ast.Import):
                found.extend(Import(a.name, child.lineno, kind, type_only) for a in child.names
                             if a.name != "pyro_vits")  # the root package: always loaded, names nothing
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    found.append(Import(sub if sub in MODULES else base, child.lineno, kind, type_only))
            elif _is_module_string(child) and id(child) not in loggers:
                found.append(Import(child.value, child.lineno, "string", type_only))
            visit(child, kind, type_only)

    visit(tree, "module", False)
    return found


def graph(include_lazy: bool) -> dict[str, set[str]]:
    """Edges between pyro_vits modules; importing ``a.b.c`` also runs the packages ``a.b`` (unless the
    importer is inside them: they are then already being imported). ``include_lazy``: also the imports in
    functions and the string imports (else only what runs at import time)."""
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for imp in imports(path):
            if (not imp.target.startswith("pyro_vits") or imp.type_only
                    or (imp.kind != "module" and not include_lazy)):
                continue
            parts = imp.target.split(".")
            for i in range(1, len(parts) + 1):
                ancestor = ".".join(parts[:i])
                if ancestor in MODULES and ancestor != name and not name.startswith(ancestor + "."):
                    edges[name].add(ancestor)
    return edges


def test_every_module_belongs_to_exactly_one_layer():
    unplaced = {m: layers_containing(m) for m in MODULES
                if m != "pyro_vits" and len(layers_containing(m)) != 1}
    assert not unplaced, f"modules without exactly one row in LAYERS (add one): {unplaced}"
    unknown = {row: sorted(allowed - LAYERS.keys())
               for row, allowed in LAYERS.items() if allowed - LAYERS.keys()}
    assert not unknown, f"rows naming layers that have no row: {unknown}"
    misplaced = {row: sorted(allowed & LEAVES) for row, allowed in LAYERS.items() if allowed & LEAVES}
    assert not misplaced, f"leaves are always allowed, do not list them: {misplaced}"
    assert all(not LAYERS[leaf] for leaf in LEAVES), "a leaf imports only other leaves"


def test_the_layer_table_is_acyclic():
    order: list[str] = []
    remaining = dict(LAYERS)
    while remaining:
        ready = [row for row, allowed in remaining.items() if not allowed & remaining.keys() - {row}]
        assert ready, f"the layer table has a cycle among {sorted(remaining)}"
        order += sorted(ready)
        for row in ready:
            del remaining[row]


def module_violations(name: str, path: Path, source: str | None = None) -> list[tuple[str, str]]:
    """``(target, "file:line -> target (why)")`` for each import of module ``name`` that the table forbids."""
    (row,) = layers_containing(name)
    allowed = {row} | LAYERS[row] | LEAVES
    bad = []
    for imp in imports(path, source):
        if imp.target != "pyro_vits" and not imp.target.startswith("pyro_vits."):
            continue
        target_row = layer_of(imp.target)
        if target_row in allowed:
            continue
        what = "the public names of pyro_vits" if target_row is None else f"layer {target_row!r}"
        bad.append((imp.target, f"{path.relative_to(ROOT)}:{imp.line} -> {imp.target} ({imp.kind} import; "
                                f"{what} is neither in {row!r}'s row {sorted(LAYERS[row])} nor a leaf)"))
    return bad


def test_imports_follow_the_layer_table():
    bad = [message for name, path in MODULES.items() if path != TOP
           for _, message in module_violations(name, path)]
    assert not bad, ("imports that the layer table (LAYERS in tests/test_architecture.py) forbids:\n"
                     + "\n".join(bad))


def test_the_layer_check_sees_every_kind_of_import():
    source = '''
import importlib
from .. import _validate
from ..data.batch import Batch
def lazy():
    from ..kl import loss
    return importlib.import_module("pyro_vits.apps")
def __getattr__(name):
    import pyro_vits.train
    from pyro_vits import fit
'''
    path = PACKAGE / "nn" / "_probe.py"
    found = {(i.target, i.kind) for i in imports(path, source)}
    assert found == {("importlib", "module"), ("pyro_vits._validate", "module"),
                     ("pyro_vits.data.batch", "module"), ("pyro_vits.kl.loss", "function"),
                     ("pyro_vits.apps", "string"), ("pyro_vits.train", "function"), ("pyro_vits", "function")}
    messages = [message for _, message in module_violations("pyro_vits.nn._probe", path, source)]
    assert [message.split(" (")[0] for message in messages] == [
        "pyro_vits/nn/_probe.py:4 -> pyro_vits.data.batch", "pyro_vits/nn/_probe.py:6 -> pyro_vits.kl.loss",
        "pyro_vits/nn/_probe.py:7 -> pyro_vits.apps", "pyro_vits/nn/_probe.py:9 -> pyro_vits.train",
        "pyro_vits/nn/_probe.py:10 -> pyro_vits"]


def test_public_name_table_targets():
    """The top-level ``__getattr__`` maps public names to packages: each target is a pyro_vits module that
    defines the name, and ``pyro_vits/__init__.py`` imports nothing else of pyro_vits."""
    assert not [i for i in imports(TOP) if i.target.startswith("pyro_vits")]
    for name, target in pyro_vits._EXPORTS.items():
        assert target in MODULES, f"pyro_vits.{name} -> {target}: no such module"
        module = importlib.import_module(target)
        assert hasattr(module, name), f"pyro_vits.{name} -> {target}: no {name} there"


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := dfs(node)):
            return found
    return None


@pytest.mark.parametrize("include_lazy", [False, True], ids=["import-time", "with-lazy-imports"])
def test_the_import_graph_has_no_cycles(include_lazy):
    edges = graph(include_lazy)
    assert sum(map(len, edges.values())) > 20  # the parser found the imports
    assert cycle(edges) is None, " -> ".join(cycle(edges))


def test_training_and_distributed_do_not_import_each_other():
    edges = graph(include_lazy=True)
    train = {m for m in MODULES if m == "pyro_vits.train" or m.startswith("pyro_vits.train.")}
    assert not any("pyro_vits.infer.distributed" in edges[m] for m in train)
    assert not edges["pyro_vits.infer.distributed"] & train
    assert "pyro_vits.models.prior_model" not in edges["pyro_vits.models.guides"]  # model and guides: peers


def test_no_module_imports_examples_or_benchmarks_or_reads_repository_paths():
    offenders = []
    for name, path in MODULES.items():
        text = path.read_text()
        bad_imports = [i.target for i in imports(path)
                       if i.target.split(".")[0] in ("examples", "benchmarks")]
        if bad_imports or re.search(r"\bREPO\b|parents\[|spec_from_file_location|sys\.path", text):
            offenders.append(name)
    assert not offenders


def test_torch_free_command_line_modules():
    code = ("import sys, pyro_vits, pyro_vits.cli, pyro_vits.apps, pyro_vits.apps._args; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_top_level_names_and_version():
    assert isinstance(pyro_vits.__version__, str) and pyro_vits.__version__
    for name in pyro_vits.__all__:
        assert getattr(pyro_vits, name) is not None, name
    from pyro_vits.models import make_teacher
    from pyro_vits.models import make_teacher as compat

    assert pyro_vits.make_teacher is make_teacher is compat
    from pyro_vits.infer import ELBOS, make_elbo
    from pyro_vits.train import ELBOS as TRAIN_ELBOS
    from pyro_vits.train import make_elbo as train_make_elbo

    assert TRAIN_ELBOS is ELBOS and train_make_elbo is make_elbo
    from pyro_vits.kl.estimators import __all__ as estimator_names

    assert "ELBOS" not in estimator_names


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = readme_python_blocks()
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), {"__name__": f"readme_{i}"})


def test_docs_api_md_is_generated_from_the_docstrings():
    spec = importlib.util.spec_from_file_location("gen_api", ROOT / "scripts" / "gen_api.py")
    gen_api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_api)
    committed = (ROOT / "docs" / "api.md").read_text()
    assert committed == gen_api.render(), "docs/api.md is stale: run make docs-api"


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("PYTHONPATH", None)
    wheels = tmp_path / "wheels"

    def run(*command: str, cwd: Path = tmp_path) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)

    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ there
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "*.egg-info",
                                                                "__pycache__", ".pytest_cache"))
    built = run(sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                "-w", str(wheels))
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("pyro_vits-*.whl")
    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=False)
    python = tmp_path / "venv" / "bin" / "python"
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = run(str(python), "-c", code).stdout.strip()
    # torch, pyro, ... from this interpreter's environment (which may itself be a virtual environment)
    Path(purelib, "current_env.pth").write_text("\n".join(sorted({sysconfig.get_paths()["purelib"],
                                                                 sysconfig.get_paths()["platlib"]})) + "\n")
    installed = run(sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                    str(wheel))
    assert installed.returncode == 0, installed.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run(str(python), "-c", "import pyro_vits; print(pyro_vits.__file__)", cwd=work)
    assert str(tmp_path / "venv") in where.stdout, where.stdout + where.stderr
    script = tmp_path / "venv" / "bin" / "pyro-vits"
    tiny = ["--steps", "2", "--n-train", "8", "--n-heldout", "4", "--frames", "8", "--hidden", "8",
            "--channels", "4", "--n-flows", "2", "--enc-layers", "1", "--eval-samples", "2",
            "--teacher-samples", "4", "--batch-size", "4", "--device", "cpu", "--no-progress"]
    done = run(str(script), "fit", *tiny, "--out", "D", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "inference_data.nc"):
        assert (work / "D" / name).is_file(), name
    again = run(str(script), "fit", *tiny, "--out", "D", cwd=work)
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert "pyro-vits fit: error: out_dir D is not empty" in again.stderr
    example = run(str(python), str(ROOT / "examples" / "fit_vits_prior.py"), "--steps", "2", "--out", "D",
                  cwd=work)
    assert example.returncode == 2 and example.stderr.count("\n") == 1, example.stderr
    assert "out_dir D is not empty" in example.stderr
    study = run(str(script), "study", "--preset", "test", "--out", "D2", "--device", "cpu", cwd=work)
    assert study.returncode == 0, study.stderr[-3000:]
    assert (work / "D2" / "results.json").is_file()
    bench = run(str(script), "bench", "--quick", "--device", "cpu", "--out-dir", "B", cwd=work)
    assert bench.returncode == 0, bench.stderr[-3000:]
    assert [p.name for p in (work / "B").glob("*.json")] == ["cpu-quick.json"]

"""The package's structure: an acyclic import graph, no reach into the repository (examples/, benchmarks/,
paths), the public names, the README's Python blocks, the generated docs/api.md, and a wheel install."""

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

import pytest

import pyro_vits

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(pyro_vits.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path) -> list[tuple[str, bool]]:
    """``(module, lazy)`` for every import in ``path`` outside ``if TYPE_CHECKING`` blocks and module
    ``__getattr__`` re-exports (names forwarded on first use); ``lazy``: inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                continue
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if child.name == "__getattr__" and node is tree:
                    continue
                visit(child, True)
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    found.append((sub if sub in MODULES else base, lazy))
            visit(child, lazy)

    tree = ast.parse(path.read_text())
    visit(tree, False)
    return found


def graph(include_lazy: bool) -> dict[str, set[str]]:
    """Edges between pyro_vits modules; importing ``a.b.c`` also runs the packages ``a.b`` (unless the
    importer is inside them: they are then already being imported)."""
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for target, lazy in imports(path):
            if not target.startswith("pyro_vits") or (lazy and not include_lazy):
                continue
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                ancestor = ".".join(parts[:i])
                if ancestor in MODULES and ancestor != name and not name.startswith(ancestor + "."):
                    edges[name].add(ancestor)
    return edges


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
    assert "pyro_vits.model" not in edges["pyro_vits.models.guides"]


def _bench_fallback() -> set[str]:
    """cli.py may read benchmarks/run.py of a checkout only while pyro_vits.apps.bench does not exist."""
    return set() if importlib.util.find_spec("pyro_vits.apps.bench") else {"pyro_vits.cli"}


def test_no_module_imports_examples_or_benchmarks_or_reads_repository_paths():
    offenders = []
    for name, path in MODULES.items():
        if name in _bench_fallback():
            continue
        text = path.read_text()
        bad_imports = [t for t, _ in imports(path) if t.split(".")[0] in ("examples", "benchmarks")]
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

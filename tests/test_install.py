"""moe_ep as users get it: sdist -> wheel (CPU-only, to stay within CI's time) -> a fresh
virtual environment that shares the system's torch, used from a directory outside the
checkout. It fails on a file under moe_ep/ (code or data the package opens) that the wheel
lacks, a source the sdist lacks, an import that works only from the checkout, and an import
that no dependency or extra declares. scripts/test.sh runs it after the main suite.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_S = 1800


def source_files(*paths: str) -> set[str]:
    """Files of the checkout under `paths` that git tracks or would track (not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return {name for name in listed if (ROOT / name).is_file()}


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without the checkout on PYTHONPATH (scripts/test.sh puts it there)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return {**env, **extra}


def run(args: list, cwd: Path, timeout: float = 600, **env: str) -> str:
    done = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (
        f"{args} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )
    return done.stdout


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("install")


@pytest.fixture(scope="module")
def sdist(work: Path) -> Path:
    """Built from a copy of the checkout's source files, as from a clean clone (setuptools
    would otherwise reuse a stale moe_ep.egg-info/SOURCES.txt of an earlier build)."""
    clone = work / "clone"
    for name in source_files():
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, clone / name)
    build = (
        "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    )
    name = run([sys.executable, "-c", build, work / "sdist"], cwd=clone).split()[-1]
    return work / "sdist" / name


@pytest.fixture(scope="module")
def wheel(work: Path, sdist: Path) -> Path:
    """Built from the unpacked sdist, so that the sdist alone must be enough to build it."""
    with tarfile.open(sdist) as archive:
        archive.extractall(work / "src", filter="data")
    (source,) = (work / "src").iterdir()
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "-w",
            work / "wheel",
            source,
        ],
        cwd=work,
        timeout=BUILD_TIMEOUT_S,
        MOE_EP_CPU_ONLY="1",
        # ccache (when present) hits across runs whatever the temporary folder is called.
        CCACHE_BASEDIR=str(source),
    )
    (built,) = (work / "wheel").glob("moe_ep-*.whl")
    return built


@pytest.fixture(scope="module")
def python(work: Path, wheel: Path) -> Path:
    """The Python of a fresh virtual environment with the wheel installed (torch shared)."""
    venv = work / "venv"
    # Without pip of its own: the system pip installs into it (and its setuptools shadows none).
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], cwd=work)
    python = venv / "bin" / "python"
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], cwd=work)
    return python


@pytest.fixture(scope="module")
def outside(work: Path) -> Path:
    """A working directory outside the checkout, holding the script that runs the ops."""
    folder = work / "elsewhere"
    folder.mkdir()
    shutil.copy(ROOT / "tests" / "installed_checks.py", folder)
    return folder


def test_sdist_carries_the_sources(sdist: Path):
    with tarfile.open(sdist) as archive:
        carried = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    needed = source_files("csrc", "moe_ep") | {"setup.py", "pyproject.toml", "README.md"}
    missing = sorted(needed - carried)
    assert not missing, f"the sdist lacks {missing}: declare them in MANIFEST.in"


def test_wheel_carries_every_package_file(wheel: Path):
    carried = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(source_files("moe_ep") - carried)
    assert not missing, (
        f"the wheel lacks {missing}: the installed package cannot open them; declare them "
        "in pyproject.toml [tool.setuptools.package-data]"
    )
    assert any(n.startswith("moe_ep/_C.") and n.endswith(".so") for n in carried), carried


def test_installed_ops_run_outside_the_checkout(python: Path, outside: Path):
    out = run([python, "installed_checks.py", ROOT], cwd=outside)
    assert "all op families pass" in out


def test_installed_plan_cli(python: Path, outside: Path):
    run([python, "-m", "moe_ep.plan", "--preset", "seeds", "--out", "seeds.json"], cwd=outside)
    layers = json.loads((outside / "seeds.json").read_text())["layers"]
    assert len(layers) == 61 and sum(not layer["dense"] for layer in layers) == 58


def test_installed_perf_validate_cli(python: Path, outside: Path):
    rows = run([python, "-m", "moe_ep.perf", "--validate"], cwd=outside).splitlines()
    assert "published" in rows[0] and "predicted" in rows[0], rows[0]
    assert len(rows) > 1, rows


def test_installed_summary(python: Path, outside: Path):
    out = run([python, "-m", "moe_ep"], cwd=outside)
    assert "CUDA kernels: not built" in out, out
    assert "moe_ep::route(Tensor logits" in out and "moe_ep::dispatch(" in out, out
    for cli in ("moe_ep.plan", "moe_ep.perf", "moe_ep.demo"):
        assert f"python -m {cli} " in out, out


def test_installed_metadata(python: Path, outside: Path):
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    show = (
        "import importlib.metadata as m, json; d = m.metadata('moe_ep'); "
        "print(json.dumps([d['Version'], d.get_all('Provides-Extra'), d.get_all('Requires-Dist')]))"
    )
    version, extras, requires = json.loads(run([python, "-c", show], cwd=outside))
    assert sorted(extras) == sorted(project["optional-dependencies"]), extras
    for extra, packages in project["optional-dependencies"].items():
        for package in packages:
            assert f'{package}; extra == "{extra}"' in requires, (package, requires)
    init = ast.parse((ROOT / "moe_ep" / "__init__.py").read_text())
    assert f"__version__ = {version!r}" in [ast.unparse(n) for n in init.body], version
    run([python, "-m", "pip", "check"], cwd=outside)  # the dependencies are satisfied


# Static checks: what the code imports against what pyproject.toml declares.


def third_party_imports(folder: str) -> dict[str, set[str]]:
    """Top-level modules that the .py files under `folder` import -> the importing files,
    leaving out the standard library, moe_ep, the folder's own modules and the checkout's
    folders (a benchmark may import tests/eplb_reference.py)."""
    files = sorted(name for name in source_files(folder) if name.endswith(".py"))
    local = {Path(name).stem for name in files} | {p.name for p in ROOT.iterdir() if p.is_dir()}
    found: dict[str, set[str]] = {}
    for name in files:
        for node in ast.walk(ast.parse((ROOT / name).read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local | {"moe_ep"}:
                    found.setdefault(top, set()).add(name)
    return found


def requirement_name(requirement: str) -> str:
    for stop in "<>=!~;[ ":
        requirement = requirement.split(stop)[0]
    return requirement.lower().replace("-", "_")


def declared() -> tuple[set[str], dict[str, set[str]]]:
    """(dependencies, {extra: its packages}) from pyproject.toml; an extra that includes
    others ("moe_ep[plot,transformers]") counts their packages."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def packages(extra: str) -> set[str]:
        found = set()
        for requirement in extras[extra]:
            if requirement_name(requirement) == "moe_ep":
                for included in requirement.split("[")[1].split("]")[0].split(","):
                    found |= packages(included.strip())
            else:
                found.add(requirement_name(requirement))
        return found

    return {requirement_name(r) for r in project["dependencies"]}, {e: packages(e) for e in extras}


def test_every_import_is_declared():
    dependencies, extras = declared()
    everything = dependencies.union(*extras.values())
    for folder, allowed in (
        ("moe_ep", everything),
        ("tests", everything),
        ("benchmarks", everything),
    ):
        undeclared = {m: f for m, f in third_party_imports(folder).items() if m not in allowed}
        assert not undeclared, (
            f"{folder}: imports that pyproject.toml does not declare: {undeclared}"
        )


def test_dependencies_are_what_moe_ep_imports():
    dependencies, _ = declared()
    unused = dependencies - set(third_party_imports("moe_ep"))
    assert not unused, f"dependencies that moe_ep never imports: {unused}"


def test_import_moe_ep_needs_no_extra():
    dependencies, extras = declared()
    optional = set().union(*extras.values()) - dependencies
    loaded = run(
        [sys.executable, "-c", "import sys, moe_ep; print(' '.join(sys.modules))"],
        cwd=ROOT,
        PYTHONPATH=str(ROOT),
    ).split()
    pulled = sorted(optional & {module.split(".")[0] for module in loaded})
    assert not pulled, f"import moe_ep loads {pulled}, which only an extra installs"

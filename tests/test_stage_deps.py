"""Each DVC stage's deps cover every graft module the stage runs, so editing one re-runs it.

The stage's code is its import closure, found by reading the source (ast) from
``graft.stages.<stage>``: every ``import graft...`` and ``from graft... import ...``, at the top
of a module or inside a function (a lazy import runs too), followed through graft's own modules.
A module missing from ``deps`` means a changed module leaves the stage's outputs stale while
``dvc status`` says the pipeline is up to date.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

SRC = REPO_ROOT / "src"
# Modules that cannot change what a stage writes, so editing them re-runs nothing: the `graft`
# command's dispatch, the package's version string, error messages and exit codes, progress
# bars, the project paths (dvc.yaml names the same paths as outs), and the params schema (the
# values a stage reads are its `params:` in dvc.yaml).
NOT_OUTPUT_CODE = {
    "graft/cli.py",
    "graft/__main__.py",
    "graft/__init__.py",
    "graft/errors.py",
    "graft/progress.py",
    "graft/paths.py",
    "graft/config.py",
}
PIPELINES = sorted(
    p.relative_to(REPO_ROOT)
    for p in REPO_ROOT.glob("**/dvc.yaml")
    if ".venv" not in p.parts and "site-packages" not in p.parts
)


def module_file(name: str) -> Path | None:
    """The source file of a graft module (a package's __init__.py), or None if not graft's."""
    base = SRC / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every graft module ``path`` imports, anywhere in it, with the packages on the way."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from graft.data import manifest` imports the module graft.data.manifest
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    found = set()
    for name in names:
        if name.split(".")[0] != "graft":
            continue
        parts = name.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {name for name in found if module_file(name) is not None}


def import_closure(module: str) -> set[str]:
    """The source files (relative to src/) of ``module`` and all graft modules it reaches."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(imported_modules(module_file(name)))
    files = {module_file(name).relative_to(SRC).as_posix() for name in seen}
    return {f for f in files if f not in NOT_OUTPUT_CODE and not _docstring_only(SRC / f)}


def _docstring_only(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def stages() -> list[tuple[str, str, str, list[str]]]:
    """(pipeline file, stage name, stage module, deps relative to the project root)."""
    found = []
    for pipeline in PIPELINES:
        definition = yaml.safe_load((REPO_ROOT / pipeline).read_text())
        for name, stage in definition["stages"].items():
            command = stage["cmd"].split()
            assert command[0] == "graft", f"{pipeline}:{name}: cmd is not a graft command"
            module = _stage_module(command[1])
            wdir = (pipeline.parent / stage.get("wdir", ".")).as_posix()
            deps = [
                (Path(wdir) / dep).as_posix().removeprefix("./")
                for dep in stage.get("deps", [])
                if "${" not in dep  # templated from params.yaml (pretrain.target_dep)
            ]
            found.append((str(pipeline), name, module, [_normalise(d) for d in deps]))
    return found


def _stage_module(command: str) -> str:
    """graft's sub-command -> the stage runner it calls (cli._run_stage's name)."""
    renamed = {"transfer-report": "transfer"}
    return "graft.stages." + renamed.get(command, command.replace("-", "_"))


def _normalise(path: str) -> str:
    return (
        Path(path).resolve().relative_to(REPO_ROOT.resolve()).as_posix() if ".." in path else path
    )


def test_every_pipeline_file_is_read():
    assert {str(p) for p in PIPELINES} >= {"dvc.yaml", "transfer/dvc.yaml"}


@pytest.mark.parametrize(
    ("pipeline", "stage", "module", "deps"),
    stages(),
    ids=[f"{pipeline}:{stage}" for pipeline, stage, _, _ in stages()],
)
def test_stage_deps_cover_its_import_closure(pipeline, stage, module, deps):
    closure = import_closure(module)
    assert f"graft/stages/{module.rsplit('.', 1)[1]}.py" in closure
    missing = sorted(
        f"src/{file}"
        for file in closure
        if not any(
            f"src/{file}" == dep or f"src/{file}".startswith(dep.rstrip("/") + "/") for dep in deps
        )
    )
    assert not missing, (
        f"{pipeline}: stage {stage} runs these modules but lacks them in deps: {missing}"
    )


@pytest.mark.parametrize(
    ("pipeline", "stage", "module", "deps"),
    stages(),
    ids=[f"{pipeline}:{stage}" for pipeline, stage, _, _ in stages()],
)
def test_stage_deps_name_no_module_the_stage_does_not_run(pipeline, stage, module, deps):
    """An extra module in deps re-runs the stage (minutes, for features) for nothing."""
    closure = {f"src/{file}" for file in import_closure(module)}
    extra = [
        dep
        for dep in deps
        if dep.startswith("src/") and not any(f == dep or f.startswith(dep + "/") for f in closure)
    ]
    assert not extra, f"{pipeline}: stage {stage} lists modules it never imports: {extra}"

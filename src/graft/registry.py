"""The model registry, native to DVC: GTO's git tags over the ``artifacts:`` of ``dvc.yaml``.

``dvc.yaml`` declares the exported model as the artifact ``model`` (``models/model.onnx``,
type, description, labels). A promotion registers the commit whose ``dvc.lock`` records the
promoted file as a version of that artifact (GTO's annotated tag ``model@vX.Y.Z``) and assigns
it the ``prod`` stage (the tag ``model#prod#N``); a rollback assigns ``prod`` back to the
restored version. The model's bytes stay in the DVC cache and remote; the tags say which
commit, and so which ``dvc.lock`` entry, is in production. Another host gets the model in
production with nothing but the git repository and the DVC remote::

    gto show model#prod --repo <git url>                        # which version is in prod
    dvc artifacts get <git url> model --stage prod -o model.onnx  # its bytes, from the remote

Registration is done only when it can be right: the project is a git repository, ``dvc.yaml``
declares the artifact, and the HEAD commit's ``dvc.lock`` records exactly the promoted file
(same md5); otherwise :func:`register_production` says why it did not, and promotion goes on.
The tags are local until pushed (``git push origin --tags``), like any tag.
"""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from graft.errors import GraftError

ARTIFACT = "model"
STAGE = "prod"


class RegistryError(GraftError):
    """The registry could not record a stage (e.g. the version named is not registered)."""


@dataclass(frozen=True)
class RegistryEntry:
    """What a promotion record says of the registry.

    Attributes:
        registered: False when nothing was tagged (``skipped`` says why).
        artifact: the ``dvc.yaml`` artifact's name.
        version: GTO's semantic version, e.g. ``v0.0.3``.
        commit: the git commit the version points at (whose ``dvc.lock`` records the model).
        version_tag: the registration tag, ``model@v0.0.3``.
        stage_tag: the tag that assigned ``prod``, ``model#prod#4``.
    """

    registered: bool
    artifact: str = ARTIFACT
    version: str | None = None
    commit: str | None = None
    version_tag: str | None = None
    stage_tag: str | None = None
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()


def is_git_repo(root: Path) -> bool:
    try:
        return _git(root, "rev-parse", "--show-toplevel") != ""
    except (subprocess.CalledProcessError, FileNotFoundError):
        return False


def artifact_path(root: Path, name: str = ARTIFACT) -> str | None:
    """The path ``dvc.yaml`` declares for artifact ``name``, or None."""
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        return None
    artifacts = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("artifacts") or {}
    entry = artifacts.get(name)
    return str(entry["path"]) if isinstance(entry, dict) and "path" in entry else None


def _locked_md5(root: Path, path: str, commit: str = "HEAD") -> str | None:
    """The md5 ``commit``'s ``dvc.lock`` records for the output ``path`` (None if none)."""
    try:
        lock = yaml.safe_load(_git(root, "show", f"{commit}:dvc.lock")) or {}
    except subprocess.CalledProcessError:
        return None
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("path") == path:
                return out.get("md5")
    return None


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def register_production(root: Path, model: Path, message: str = "") -> RegistryEntry:
    """Register the commit that records ``model`` and assign it ``prod`` (GTO tags).

    Args:
        root: the project (a git repository with DVC).
        model: the promoted file: the registered version must record these bytes.
        message: the tags' annotation (e.g. the promotion's reason).

    Returns:
        The entry for the promotion record; ``registered`` False with ``skipped`` saying why
        when the project cannot register it (not git, no artifact, HEAD records another file).
    """
    from gto import api as gto

    root = Path(root)
    if not is_git_repo(root):
        return RegistryEntry(False, skipped="not a git repository")
    path = artifact_path(root)
    if path is None:
        return RegistryEntry(False, skipped=f"dvc.yaml declares no artifact '{ARTIFACT}'")
    if _locked_md5(root, path) != _md5(model):
        return RegistryEntry(
            False,
            skipped=f"HEAD's dvc.lock does not record this {path}: commit dvc.lock (and "
            "`dvc push`) after `dvc repro`, then promote again to register it",
        )
    commit = _git(root, "rev-parse", "HEAD")
    version = _version_at(root, commit)
    if version is None:
        tag = gto.register(root, ARTIFACT, ref=commit, message=message or None)
        version = tag.version
    return assign_production(root, version, message)


def record_production(root: Path, model: Path, message: str = "") -> RegistryEntry:
    """Point ``prod`` at the registered version that records ``model``'s bytes, registering
    HEAD first if none does: what promote and rollback call after switching production."""
    root = Path(root)
    if not is_git_repo(root):
        return RegistryEntry(False, skipped="not a git repository")
    path = artifact_path(root)
    if path is not None:
        md5 = _md5(model)
        for row in reversed(_shown(root)):  # newest first
            if _locked_md5(root, path, row["commit"]) == md5:
                return assign_production(root, row["version"], message)
    return register_production(root, model, message)


def assign_production(root: Path, version: str, message: str = "") -> RegistryEntry:
    """Assign ``prod`` to the registered ``version`` (what rollback does)."""
    from gto import api as gto

    if not is_git_repo(Path(root)):
        return RegistryEntry(False, skipped="not a git repository")
    commit = _commit_of(root, version)
    if commit is None:
        raise RegistryError(
            f"{ARTIFACT}@{version} is not registered in {root}: `gto show {ARTIFACT}` lists "
            "the versions."
        )
    holders = _in_production(root)
    if [held.version for held in holders] == [version]:  # already the one: no new tag
        stage_tag = holders[0].assignments[-1].tag
    else:
        # One version in prod at a time: GTO keeps every version ever assigned in the stage
        # (and `gto show model#prod` names the highest), so the others are unassigned first.
        for held in holders:
            if held.version != version:
                gto.unassign(
                    root, ARTIFACT, version=held.version, stage=STAGE, message=message or None
                )
        # force: GTO refuses a version that was in prod before (a rollback's case)
        stage_tag = gto.assign(
            root, ARTIFACT, STAGE, version=version, message=message or None, force=True
        ).tag
    return RegistryEntry(
        True,
        version=version,
        commit=commit,
        version_tag=f"{ARTIFACT}@{version}",
        stage_tag=stage_tag,
    )


def production_version(root: Path) -> str | None:
    """The version the ``prod`` stage points at, or None."""
    holders = _in_production(root)
    return holders[0].version if holders else None


def _in_production(root: Path) -> list[Any]:
    """The versions holding ``prod`` (GTO's VStage), newest first."""
    from gto import api as gto

    return gto.find_versions_in_stage(root, ARTIFACT, STAGE, versions_per_stage=-1) or []


def _version_at(root: Path, commit: str) -> str | None:
    for row in _shown(root):
        if row["commit"] == commit:
            return row["version"]
    return None


def _commit_of(root: Path, version: str) -> str | None:
    for row in _shown(root):
        if row["version"] == version:
            return row["commit"]
    return None


def _shown(root: Path) -> list[dict[str, str]]:
    """The registered versions of the artifact: ``version`` and ``commit``."""
    from gto.registry import GitRegistry

    with GitRegistry.from_url(str(root)) as registry:
        artifact = registry.get_state().artifacts.get(ARTIFACT)
        if artifact is None:
            return []
        return [
            {"version": v.version, "commit": v.commit_hexsha}
            for v in artifact.versions
            if v.is_registered
        ]

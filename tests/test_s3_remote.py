"""Data and artifacts on an S3-compatible DVC remote: a local S3 server (moto, started here on
127.0.0.1) takes a push; a fresh clone pulls the same bytes and DVC finds nothing to do."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from graft.sample_data import write_sample_data

BUCKET = "graft-store"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    import boto3  # with dvc-s3 and moto: the train and dev extras in pyproject.toml
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, **_boto_credentials()).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
    }


def run(root: Path, *command: str) -> str:
    environment = {**os.environ, **CREDENTIALS, "NO_PROXY": "127.0.0.1"}
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, env=environment)
    assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
    return result.stdout


def dvc(root: Path, *args: str) -> str:
    return run(root, sys.executable, "-m", "dvc", *args)


def git(root: Path, *args: str) -> str:
    return run(root, "git", "-c", "user.name=graft", "-c", "user.email=graft@example.com", *args)


def test_push_then_a_fresh_clone_pulls_the_same_data_and_artifacts(tmp_path, s3_endpoint):
    import boto3

    origin = tmp_path / "origin"
    write_sample_data(origin / "data", per_class=3)
    (origin / "models").mkdir()
    (origin / "models" / "model.onnx").write_bytes(os.urandom(4096))  # an artifact's bytes
    git(origin, "init", "-q")
    dvc(origin, "init", "-q")
    dvc(origin, "config", "core.analytics", "false")
    dvc(origin, "remote", "add", "-d", "store", f"s3://{BUCKET}/graft")
    dvc(origin, "remote", "modify", "store", "endpointurl", s3_endpoint)
    dvc(origin, "add", "data", "models/model.onnx")
    git(origin, "add", "-A")
    git(origin, "commit", "-qm", "data and model on S3")
    dvc(origin, "push")

    stored = boto3.client("s3", endpoint_url=s3_endpoint, **_boto_credentials()).list_objects_v2(
        Bucket=BUCKET, Prefix="graft/"
    )
    assert stored["KeyCount"] >= 30 + 1  # every image and the model, content-addressed

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(origin), str(clone))
    assert not (clone / "data").exists()
    dvc(clone, "pull")
    for name in ("data", "models"):
        assert _contents(clone / name) == _contents(origin / name)
    assert "Data and pipelines are up to date." in dvc(clone, "status")
    assert "Cache and remote 'store' are in sync." in dvc(clone, "status", "--cloud")


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

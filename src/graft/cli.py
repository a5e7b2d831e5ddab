"""The ``graft`` command: one sub-command per pipeline stage, plus helpers around them.

Stage modules are imported inside each command so that ``graft --help`` stays instant.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import typer

from graft.errors import GraftError

app = typer.Typer(
    help="graft: transfer learning on images — validate, embed, train, fine-tune, gate, export.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

ROOT = typer.Option(Path("."), "--root", help="Project root: the folder holding params.yaml.")


def _run_stage(name: str, root: Path) -> None:
    module = importlib.import_module(f"graft.stages.{name}")
    try:
        module.main(root)
    except GraftError as exc:
        typer.secho(f"graft {name.replace('_', '-')}: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


@app.command("sample-data")
def sample_data(
    dest: Path = typer.Option(Path("data"), help="Folder to write the digits into."),
    per_class: int = typer.Option(None, min=1, help="Only this many images per class."),
    if_empty: bool = typer.Option(
        False, "--if-empty", help="Do nothing (successfully) when the folder already has files."
    ),
) -> None:
    """Write scikit-learn's 1,797 handwritten digits as PNGs into DEST/<class>/."""
    from graft.sample_data import write_sample_data

    if if_empty and dest.exists() and any(dest.iterdir()):
        typer.echo(f"{dest} already has files; leaving it as it is.")
        return
    try:
        count = write_sample_data(dest, per_class)
    except FileExistsError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    typer.echo(f"Wrote {count} sample images into {dest}/.")


@app.command()
def validate(root: Path = ROOT) -> None:
    """Check every image, quarantine bad files, split, and write the manifest."""
    _run_stage("validate", root)


@app.command()
def features(root: Path = ROOT) -> None:
    """Embed every image with the frozen pretrained backbone."""
    _run_stage("features", root)


@app.command("train-head")
def train_head(root: Path = ROOT) -> None:
    """Train the linear head on the cached features."""
    _run_stage("train_head", root)


@app.command()
def finetune(root: Path = ROOT) -> None:
    """Fine-tune the backbone's top blocks together with the head (LP-FT)."""
    _run_stage("finetune", root)


@app.command()
def evaluate(root: Path = ROOT) -> None:
    """Score both models on test, choose the candidate on val, and apply the gate."""
    _run_stage("evaluate", root)


@app.command()
def export(root: Path = ROOT) -> None:
    """Export the blessed candidate to ONNX and check parity with torch."""
    _run_stage("export", root)

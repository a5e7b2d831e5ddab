"""The ``graft`` command: one sub-command per pipeline stage, plus helpers around them.

Stage modules are imported inside each command so that ``graft --help`` stays instant.
"""

from __future__ import annotations

import gc
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from graft.errors import ExitCode, GraftError

app = typer.Typer(
    help="graft: transfer learning on images — validate, embed, train, fine-tune, gate, export.",
    epilog=(
        "Exit status: 0 done, 1 failure, 2 wrong command line, 3 refused by a gate, "
        "4 input needs attention (params.yaml, data, a file given)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"graft {version('graft')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print graft's version."
    ),
) -> None:
    pass  # the options above act in their callbacks; each sub-command does the work


ROOT = typer.Option(Path("."), "--root", help="Project root: the folder holding params.yaml.")


@contextmanager
def _reported(command: str) -> Iterator[None]:
    """A GraftError becomes one red line naming the command, and its class's exit status
    (graft.errors.ExitCode; no traceback)."""
    try:
        yield
    except GraftError as exc:
        typer.secho(f"graft {command}: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(exc.exit_code) from None


def _run_stage(name: str, root: Path) -> None:
    module = importlib.import_module(f"graft.stages.{name}")
    with _reported(name.replace("_", "-")):
        module.main(root)
    # The process ends here. Frozen, the objects the stage's libraries made (hundreds of
    # thousands after Great Expectations or torch) are skipped by the collector's full passes at
    # interpreter shutdown, a second of waiting after the outputs are written; exit handlers
    # and finalizers run as before.
    gc.freeze()


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
        raise typer.Exit(ExitCode.BAD_INPUT) from None
    typer.echo(f"Wrote {count} sample images into {dest}/.")


@app.command("check-data")
def check_data(
    root: Path = ROOT,
    record: bool = typer.Option(
        False, "--record", help="Record a changed data/ (`dvc add --no-relink data`)."
    ),
) -> None:
    """Before DVC touches data/: stop if it differs from data.dvc or holds what DVC cannot
    version (broken or outside links, FIFOs)."""
    from graft.stages.check_data import main

    with _reported("check-data"):
        found = main(root, record=record)
    typer.echo(f"data/: {found}")


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
    """Train the head (linear, MLP, or few-shot prototypes/probe) on the cached features."""
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


@app.command()
def promote(
    root: Path = ROOT,
    force: bool = typer.Option(
        False, "--force", help="Promote even if the change gates against production fail."
    ),
    reason: str = typer.Option(
        None, "--reason", help="Why a forced promotion is right (required with --force)."
    ),
) -> None:
    """Gate the exported model against production, serve-check it, then switch production."""
    from graft.config import load_params
    from graft.paths import ProjectPaths
    from graft.promotion import promote as promote_model

    with _reported("promote"):
        record = promote_model(root, load_params(ProjectPaths(root).params), force, reason)
    if record.unchanged:
        typer.echo(f"{record.version} is already in production: nothing changed.")
        return
    forced = " (forced: " + record.reason + ")" if record.forced else ""
    typer.echo(f"Promoted {record.version} to production{forced}.")
    _record_in_registry(root, "promote")


@app.command()
def rollback(
    root: Path = ROOT,
    to: str = typer.Option(
        None,
        "--to",
        metavar="VERSION",
        help="A kept version (sha256 prefix, see versions.json); default: the one before.",
    ),
) -> None:
    """Put back the model promoted before the current one, or a kept version (--to)."""
    from graft.config import load_params
    from graft.paths import ProjectPaths
    from graft.promotion import rollback as rollback_model

    with _reported("rollback"):
        restored = rollback_model(root, load_params(ProjectPaths(root).params), to)
    typer.echo(f"Rolled back: production is {restored[:12]} again.")
    _record_in_registry(root, "rollback")


def _record_in_registry(root: Path, action: str) -> None:
    """The registry hook of promote and rollback: point GTO's ``prod`` stage at the model now
    in production and name the tags in its promotion record (graft.registry)."""
    from graft.config import load_params
    from graft.files import read_json, write_json
    from graft.paths import ProjectPaths
    from graft.promotion import production_dir
    from graft.registry import record_production

    production = production_dir(ProjectPaths(root), load_params(ProjectPaths(root).params))
    with _reported(action):
        entry = record_production(root, production / "model.onnx", f"graft {action}")
        record_path = production / "promotion.json"
        if record_path.is_file():
            write_json(record_path, {**read_json(record_path), "registry": entry.to_dict()})
    if entry.registered:
        typer.echo(
            f"Registry: {entry.version_tag} is in prod ({entry.stage_tag}); publish with "
            "`git push origin --tags` and `dvc push`."
        )
    else:
        typer.echo(f"Registry: not recorded ({entry.skipped}).")


@app.command("select-backbone")
def select_backbone(
    root: Path = ROOT,
    apply: bool = typer.Option(
        False, "--apply", help="Write the best candidate into params.yaml (backbone.* only)."
    ),
) -> None:
    """Rank the select.candidates backbones by quick probes on val against time per image."""
    from graft.stages import select_backbone as stage
    from graft.studies.selection import BACKBONE_KEYS

    with _reported("select-backbone"):
        report, applied = stage.main(root, apply)
    for row in report["ranking"]:
        typer.echo(
            f"{row['rank']}. {row['name']} ({row['weights']}): val accuracy "
            f"{row['val_accuracy']:.4f} ({row['best_probe']}), {row['ms_per_image']:.2f} ms/image, "
            f"{row['parameters'] / 1e6:.2f} M parameters"
        )
    best = report["best"]
    if report["lead_within_noise"]:
        typer.echo(
            f"The lead over the runner-up ({report['lead_over_runner_up']:.4f}) is within the "
            f"val noise (±{report['val_noise_95']:.4f}): not evidence that the best is better."
        )
    if not report["change_needed"]:
        typer.echo("params.yaml already uses the best candidate: nothing to change.")
    elif applied:
        typer.echo(f"Applied: params.yaml now has backbone {best['name']} ({best['weights']}).")
    else:
        lines = "\n".join(
            f"  {key}: {best[key] if best[key] is not None else 'null'}" for key in BACKBONE_KEYS
        )
        typer.echo(
            f"To use the best candidate, set in params.yaml (or rerun with --apply):\n"
            f"backbone:\n{lines}"
        )
    typer.echo(f"Report: {root / 'reports' / 'backbone_selection.md'}")


@app.command()
def kshot(root: Path = ROOT) -> None:
    """Test accuracy with k train images per class (kshot.k), over kshot.seeds draws."""
    from graft.stages import kshot as stage

    with _reported("kshot"):
        report = stage.main(root)
    for point in report["curve"]:
        cells = ", ".join(
            f"{head} {point[head]['mean']:.4f} ± {point[head]['std']:.4f}"
            for head in ("prototype", "probe")
        )
        typer.echo(f"k={point['k']}: {cells}")
    for row in report["probe_c_on_val"] or []:
        typer.echo(
            f"k={row['k']}: val chooses probe C = {row['chosen_c']:g} "
            f"(best mean at C = {row['best_c']:g})"
        )
    typer.echo(f"{report['test_images']} test images; report: {root / 'reports' / 'kshot.md'}")


@app.command()
def pretrain(root: Path = ROOT) -> None:
    """Train a source model on pretrain.source_dir and save it for backbone.weights: file:PATH."""
    _run_stage("pretrain", root)


@app.command("transfer-report")
def transfer_report(root: Path = ROOT) -> None:
    """Transferred vs from-scratch on the target data: three figures, curves, data efficiency."""
    _run_stage("transfer", root)


# Serving: graft.serving (onnxruntime, FastAPI) is imported inside the commands, so that
# `graft --help` works without it and the CLI never imports torch on the way to a server.
@app.command()
def serve(
    model: Path = typer.Argument(
        ..., help="The exported model, e.g. models/production/model.onnx."
    ),
    host: str = typer.Option(
        "127.0.0.1", help="Address to listen on; 0.0.0.0 for every interface."
    ),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port."),
    max_body_bytes: int = typer.Option(
        16 * 1024 * 1024, min=1, help="Largest request body; larger ones get 413."
    ),
    max_pixels: int = typer.Option(
        40_000_000, min=1, help="Largest width x height of one image; larger ones get 413."
    ),
    max_batch: int = typer.Option(32, min=1, help="Most images in one request; more get 413."),
    top_k: int = typer.Option(5, min=1, help="Labels per image unless a request asks ?top_k=."),
    reload_interval: float = typer.Option(
        2.0, min=0, help="Seconds between checks for a replaced model file; 0 never reloads."
    ),
    threads: int = typer.Option(
        0, min=0, help="onnxruntime threads per worker; 0: the cores divided among the workers."
    ),
    workers: int = typer.Option(
        1, min=1, help="Server processes; each loads the model (memory x N) and takes the limits."
    ),
    max_connections: int = typer.Option(
        256, min=1, help="Open connections per worker; more get 503 with Retry-After."
    ),
    max_concurrent_uploads: int = typer.Option(
        32, min=1, help="Bodies read or classified at once per worker; more get 503."
    ),
    header_timeout: float = typer.Option(
        10.0, min=0.1, help="Seconds to send a request's headers; then 408 and close."
    ),
    body_timeout: float = typer.Option(
        30.0, min=0.1, help="Seconds to send a request's body; then 408."
    ),
    log_format: str = typer.Option(
        "text", help="text, or json: one JSON object per line (request id, status, latency...)."
    ),
    docs: bool = typer.Option(True, help="Serve the interactive API docs at /docs and /redoc."),
    model_name: str = typer.Option(
        "graft", help="The model's name in the Open Inference Protocol (/v2/models/NAME)."
    ),
) -> None:
    """Serve MODEL over HTTP: POST /predict, /v2 (KServe), GET /healthz, /readyz, /metadata,
    /metrics, /docs."""
    from graft.serving.limits import Limits, ServerLimits
    from graft.serving.server import ServeSettings, run_server, threads_per_worker

    if log_format not in ("text", "json"):
        raise typer.BadParameter("text or json", param_hint="--log-format")
    settings = ServeSettings(
        model_path=str(model),
        limits=Limits(max_body_bytes, max_pixels, max_batch, top_k),
        server_limits=ServerLimits(
            max_connections, max_concurrent_uploads, header_timeout, body_timeout
        ),
        reload_interval_s=reload_interval,
        threads=threads_per_worker(threads, workers),
        model_name=model_name,
        docs=docs,
    )
    with _reported("serve"):
        run_server(settings, host, port, workers, log_format)


@app.command()
def predict(
    model: Path = typer.Argument(..., help="The exported model (.onnx)."),
    paths: list[Path] = typer.Argument(..., help="Image files and folders (walked recursively)."),
    output: Path = typer.Option(
        None, "--output", "-o", help="FILE.csv or FILE.json; CSV on standard output if left out."
    ),
    top_k: int = typer.Option(5, min=1, help="Labels per image, most probable first."),
    batch_size: int = typer.Option(32, min=1, help="Images per inference call."),
    max_pixels: int = typer.Option(
        40_000_000, min=1, help="Larger images are reported as too_many_pixels, not decoded."
    ),
) -> None:
    """Classify images into a table; unusable files are rows with an error, not a failure."""
    from collections import Counter

    from graft.serving.model import load_model
    from graft.serving.predict import (
        collect_images,
        encoded,
        output_format,
        predict_files,
        render,
        write_predictions,
    )

    with _reported("predict"):
        output_format(output)
        files = collect_images(paths)
        served = load_model(model)
        k = min(top_k, len(served.labels))
        rows = predict_files(served, files, top_k=k, batch_size=batch_size, max_pixels=max_pixels)
        if output is None:
            typer.echo(encoded(render(rows, "csv", k)), nl=False)
        else:
            write_predictions(rows, output, k)
    errors = Counter(row.error.reason for row in rows if row.error is not None)
    listed = ", ".join(f"{reason}: {count}" for reason, count in sorted(errors.items()))
    typer.echo(
        f"predict: {len(rows)} files, {len(rows) - sum(errors.values())} predicted, "
        f"{sum(errors.values())} errors{f' ({listed})' if listed else ''}"
        f"{f' -> {output}' if output else ''}",
        err=True,
    )

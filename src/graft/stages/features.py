"""Stage ``features``: embed every validated image with the frozen backbone, per split.

The embeddings come from the content-addressed cache (``features.cache_dir``, outside the DVC
outputs), so a re-run computes only images it has not seen with this backbone, weights,
preprocessing and precision; the split matrices under ``artifacts/features/`` are assembled
from it.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from graft.classifier import ModelSpec, write_spec
from graft.config import Params, load_params
from graft.data.manifest import read_manifest, usable_labels, usable_rows
from graft.data.splits import SPLITS
from graft.embedding import Embedding, embed, int8_gate
from graft.features import save_feature_set
from graft.files import write_json
from graft.paths import ProjectPaths


def main(root: Path = Path(".")) -> ModelSpec:
    paths = ProjectPaths(root)
    params = load_params(paths.params)
    manifest = read_manifest(paths.manifest)
    usable = usable_rows(manifest)
    embedding, metrics = embed_for_training(usable, paths, params)
    for split in SPLITS:
        save_feature_set(embedding.feature_sets[split], paths.features / f"{split}.npz")
    backbone = embedding.backbone
    spec = ModelSpec(
        backbone.name, backbone.weights, backbone.weights_sha256, backbone.data_config,
        embedding.labels,
    )  # fmt: skip
    write_spec(paths.features / "spec.json", spec)
    write_json(paths.metrics / "features.json", metrics)
    return spec


def embed_for_training(usable, paths: ProjectPaths, params: Params) -> tuple[Embedding, dict]:
    """The features for train_head, at the precision the params ask for and the gate allows."""
    cache_dir = paths.root / params.features.cache_dir
    backbone, auto = params.backbone, None
    if backbone.name == "auto":  # ranked by a quick CV probe on train + val, within a budget
        from graft.auto_backbone import choose_backbone

        auto = choose_backbone(usable, paths.data, params, cache_dir, usable_labels(usable))
        backbone = backbone.model_copy(update={"name": auto["chosen"]})
        print(f"features (auto): {auto['chosen']} chosen in {auto['seconds']:.0f} s")
    fp32 = embed(usable, paths.data, backbone, params.features, cache_dir, precision="fp32")
    metrics = {"precision_requested": params.features.precision, **_counts("fp32", fp32)}
    if auto is not None:
        metrics["auto_backbone"] = auto
    chosen = fp32
    if params.features.precision == "int8":
        int8 = embed(
            usable, paths.data, fp32.backbone, params.features, cache_dir, precision="int8"
        )
        metrics.update(_counts("int8", int8))
        decision = int8_gate(
            fp32.feature_sets,
            int8.feature_sets,
            len(fp32.labels),
            params.head,
            params.features.int8_max_val_drop,
        )
        metrics["int8_gate"] = asdict(decision)
        if decision.accepted:
            chosen = int8
            print(f"features: INT8 accepted ({decision.reason})")
        else:
            print(
                f"features: INT8 refused ({decision.reason}); the fp32 features are used. "
                "Raise features.int8_max_val_drop to accept it, or set precision: fp32."
            )
    metrics["precision"] = chosen.key.precision
    report = chosen.report
    print(
        f"features: {report.images} images ({metrics['precision']}), {report.reused} from the "
        f"cache, {report.computed} computed in {report.seconds:.1f} s"
    )
    return chosen, metrics


def _counts(prefix: str, embedding: Embedding) -> dict:
    report = embedding.report
    return {
        f"{prefix}_images": report.images,
        f"{prefix}_reused": report.reused,
        f"{prefix}_computed": report.computed,
        f"{prefix}_seconds": round(report.seconds, 3),
    }

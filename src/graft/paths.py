"""Where each stage reads and writes, relative to the project root (the folder of dvc.yaml).

``dvc.yaml`` names the same paths; keep the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProjectPaths:
    root: Path = Path(".")

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def data_dvc(self) -> Path:
        return self.root / "data.dvc"

    @property
    def manifest(self) -> Path:
        return self.root / "artifacts" / "manifest.csv"

    @property
    def data_profile(self) -> Path:
        """The drift baseline: the profile of the last data version that passed validation.

        dvc.yaml declares it ``persist: true``, so DVC keeps it when it re-runs the stage (an
        ordinary out is deleted first), and ``dvc checkout``/``dvc pull`` restore the one recorded
        in dvc.lock: after ``git checkout REV``, drift is measured against that revision's data.
        """
        return self.root / "artifacts" / "data_profile.json"

    @property
    def features(self) -> Path:
        return self.root / "artifacts" / "features"

    @property
    def validation_reports(self) -> Path:
        return self.root / "reports" / "validation"

    @property
    def head_model(self) -> Path:
        return self.root / "models" / "head.pt"

    @property
    def finetuned_model(self) -> Path:
        return self.root / "models" / "finetuned.pt"

    @property
    def blessing(self) -> Path:
        return self.root / "models" / "blessing.json"

    @property
    def onnx_model(self) -> Path:
        return self.root / "models" / "model.onnx"

    @property
    def int8_dir(self) -> Path:
        """The INT8 model (``model.onnx``, only when kept) and ``decision.json``."""
        return self.root / "models" / "int8"

    @property
    def portable_dir(self) -> Path:
        """The uint8-input variant and its ``labels.txt`` (export.preprocess_in_graph)."""
        return self.root / "models" / "portable"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def evaluation_report(self) -> Path:
        return self.root / "reports" / "evaluation.md"

    @property
    def evaluation_details(self) -> Path:
        return self.root / "reports" / "evaluation.json"

    @property
    def model_card(self) -> Path:
        return self.root / "models" / "model_card.md"

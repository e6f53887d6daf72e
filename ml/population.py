"""Which population a film comes from (young child vs adult), to compare with the one a model was
validated on.

The patient's age decides when the DICOM header gives it (PatientAge, else PatientBirthDate with
StudyDate / AcquisitionDate / ContentDate). Otherwise an image-based head decides: a logistic
regression on the bundled network's pooled backbone features (the same 1280-d vector the OOD gate
scores, so it costs no extra forward pass), fitted on the shared pediatric (Kermany, children aged
1-5) and adult (NIH ChestX-ray14 aged >= 18, Hannover COVID-19) films; its held-out accuracy per
source is in the gate manifest and the model card.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date

import numpy as np
import torch

from ml.image import ImageMetadata

PEDIATRIC = "pediatric"
ADULT = "adult"
# The bundled model's training films are Kermany's children aged 1-5: older children are outside it.
PEDIATRIC_VALIDATED_MAX_AGE = 6.0

_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$", re.IGNORECASE)
_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


@dataclass(frozen=True)
class PopulationResult:
    population: str  # PEDIATRIC | ADULT
    source: str  # "dicom_age" | "image"
    score: float  # image head: P(pediatric); from the age: 1.0 / 0.0
    age_years: float | None = None


def _dicom_date(value: str | None) -> date | None:
    text = (value or "").strip()
    if len(text) < 8 or not text[:8].isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def age_years(meta: ImageMetadata) -> float | None:
    """The patient's age at the study from DICOM PatientAge or birth date + study date, else None."""
    extra = meta.extra
    m = _AGE.match(extra.get("patient_age", "") or "")
    if m:
        return int(m.group(1)) * _UNIT_YEARS[m.group(2).upper()]
    born = _dicom_date(extra.get("patient_birth_date"))
    when = _dicom_date(extra.get("study_date"))
    if born and when and when >= born:
        return (when - born).days / 365.25
    return None


@dataclass
class PopulationParams:
    w: np.ndarray  # (D,) logistic weights on pooled features; positive = pediatric
    b: float

    def to_state(self) -> dict[str, torch.Tensor]:
        return {"population.w": torch.from_numpy(self.w.astype(np.float32)),
                "population.b": torch.tensor([self.b], dtype=torch.float32)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> PopulationParams | None:
        if "population.w" not in state:
            return None
        return cls(w=state["population.w"].double().numpy(), b=float(state["population.b"][0]))

    def probability(self, feats: np.ndarray) -> np.ndarray:
        z = np.clip(np.asarray(feats, dtype=np.float64) @ self.w + self.b, -60, 60)
        return 1.0 / (1.0 + np.exp(-z))


def classify(meta: ImageMetadata, pooled: np.ndarray | None, params: PopulationParams | None) -> PopulationResult | None:
    age = age_years(meta)
    if age is not None and math.isfinite(age):
        pop = PEDIATRIC if age < PEDIATRIC_VALIDATED_MAX_AGE else ADULT
        return PopulationResult(pop, "dicom_age", 1.0 if pop == PEDIATRIC else 0.0, round(age, 2))
    if params is None or pooled is None:
        return None
    p = float(params.probability(np.asarray(pooled)[None])[0])
    return PopulationResult(PEDIATRIC if p >= 0.5 else ADULT, "image", p)


ADULT_MODEL_HINT = ("Adult films are served by the 18-finding TorchXRayVision DenseNet: run "
                    "`cxr models pull densenet121-res224-all`, then serve with CXR_MODEL=xrv:densenet121-res224-all.")


def outside_message(model_name: str, validated: str, result: PopulationResult) -> str:
    """The warning shown with a result for a film outside the model's validated population."""
    if result.source == "dicom_age":
        evidence = f"patient age {result.age_years:g} years from the DICOM header"
    else:
        evidence = f"judged from the image, P(pediatric) {result.score:.2f}"
    who = "children aged 1-5" if validated == PEDIATRIC else "adults"
    text = (f"Outside the validated population: {model_name} was validated on {who}, and this film looks "
            f"{result.population} ({evidence}). The result is for information only and is never triaged urgent.")
    return text + (" " + ADULT_MODEL_HINT if validated == PEDIATRIC else "")

"""The one place that turns model probabilities into findings, triage, confidence and the report.

Definitions (also in the README):

Severity -- from the probability p relative to the finding's operating threshold t:
    p <  t                      -> "none"   (not detected)
    t <= p < t + (1 - t) / 3    -> "low"
    t + (1 - t) / 3 <= p < t + 2 (1 - t) / 3 -> "moderate"
    p >= t + 2 (1 - t) / 3      -> "high"
  i.e. the detected range [t, 1] is split into equal thirds. Severity therefore says how far past
  the operating point the model is, not how severe the disease is radiologically.

Critical findings -- pneumothorax, pneumonia, effusion, edema, consolidation. Study triage is
  "urgent" when any critical finding is detected, otherwise "routine".

Ranking -- findings are sorted by severity (high > moderate > low > none), then probability,
  highest first.

Confidence -- per finding, how clearly the yes/no call sits away from the operating point:
      c = sigmoid(|logit(p) - logit(t)|)            in [0.5, 1)
  This is exactly max(p, 1 - p) after shifting the operating point to 0.5 on the logit scale: it is
  0.5 at the threshold (a coin toss) and approaches 1 as the probability moves away from it. The
  probabilities are calibrated (the bundled model is temperature-scaled; TorchXRayVision models are
  normalised with op_norm so their threshold sits at 0.5), so c reads as the model's own estimate that
  the call is right. The study `confidence_score` is the minimum over all findings: the weakest call
  decides how much the whole answer can be trusted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ml.analysis import Finding, ModelInfo

CRITICAL_FINDINGS = frozenset({"pneumothorax", "pneumonia", "effusion", "edema", "consolidation"})

DISCLAIMER = "AI-generated preliminary result for decision support by a qualified clinician; not a diagnosis."

UNTRAINED_WARNING = (
    "UNTRAINED DEMO MODEL: these numbers come from random weights and mean nothing. "
    "Do not use for any clinical or research purpose."
)

NO_FINDING = "No finding above threshold"

_SEVERITY_RANK = {"none": 0, "low": 1, "moderate": 2, "high": 3}
_EPS = 1e-6


def severity(probability: float, threshold: float) -> str:
    """Severity band of `probability` relative to `threshold` (see the module docstring)."""
    if probability < threshold:
        return "none"
    span = 1.0 - threshold
    if span <= 0.0:
        return "high"
    position = (probability - threshold) / span
    if position < 1.0 / 3.0:
        return "low"
    if position < 2.0 / 3.0:
        return "moderate"
    return "high"


def _logit(p: float) -> float:
    p = min(max(p, _EPS), 1.0 - _EPS)
    return math.log(p / (1.0 - p))


def call_confidence(probability: float, threshold: float) -> float:
    """sigmoid(|logit(p) - logit(t)|): 0.5 at the threshold, towards 1 far from it."""
    distance = abs(_logit(probability) - _logit(threshold))
    return 1.0 / (1.0 + math.exp(-distance))


def make_findings(
    labels: Sequence[str],
    displays: Sequence[str],
    probabilities: Sequence[float],
    thresholds: Sequence[float],
) -> list[Finding]:
    """One Finding per model output, ranked. Regions and heatmaps are attached later (explain)."""
    if not (len(labels) == len(displays) == len(probabilities) == len(thresholds)):
        raise ValueError("labels, displays, probabilities and thresholds must have the same length")
    findings = []
    for label, display, p, t in zip(labels, displays, probabilities, thresholds, strict=True):
        p = float(min(max(p, 0.0), 1.0))
        t = float(t)
        findings.append(
            Finding(
                label=label,
                display=display,
                probability=p,
                threshold=t,
                detected=p >= t,
                severity=severity(p, t),
                critical=label in CRITICAL_FINDINGS,
            )
        )
    return rank(findings)


def rank(findings: Sequence[Finding]) -> list[Finding]:
    """Severity, then probability, highest first (stable for ties)."""
    return sorted(findings, key=lambda f: (_SEVERITY_RANK[f.severity], f.probability), reverse=True)


def triage(findings: Sequence[Finding]) -> str:
    return "urgent" if any(f.detected and f.critical for f in findings) else "routine"


def study_confidence(findings: Sequence[Finding]) -> float:
    """Minimum per-finding confidence; 0.5 (no information) for a model with no outputs."""
    if not findings:
        return 0.5
    return min(call_confidence(f.probability, f.threshold) for f in findings)


OUTSIDE_POPULATION = "OUTSIDE THE VALIDATED POPULATION (not triaged urgent)"


def impression(findings: Sequence[Finding], *, untrained: bool = False, outside_population: bool = False) -> str:
    """One line for a busy reader."""
    detected = [f for f in findings if f.detected]
    if detected:
        parts = ", ".join(f"{f.display.lower()} ({f.severity})" for f in detected)
        line = f"AI suggests {parts}"
        line += "; urgent review advised." if triage(findings) == "urgent" and not outside_population else "."
    else:
        line = f"{NO_FINDING} among the {len(findings)} findings assessed."
    if outside_population:
        line = f"{OUTSIDE_POPULATION}: " + line
    if untrained:
        line = "UNTRAINED DEMO MODEL (meaningless output): " + line
    return line


def report_text(
    findings: Sequence[Finding],
    *,
    model: ModelInfo,
    confidence: float,
    view_position: str | None = None,
    warnings: Sequence[str] = (),
    outside_population: bool = False,
) -> str:
    """Short plain-text report: findings, impression, triage, model, disclaimer (always last)."""
    lines: list[str] = []
    if model.untrained:
        lines += [f"*** {UNTRAINED_WARNING} ***", ""]
    for w in warnings:
        lines += [f"*** WARNING: {w} ***"]
    if warnings:
        lines.append("")
    view = f" ({view_position})" if view_position else ""
    lines.append(f"AI chest radiograph analysis{view}")
    lines.append("Findings:")
    detected = [f for f in findings if f.detected]
    for f in detected:
        flag = ", critical" if f.critical else ""
        lines.append(
            f"- {f.display}: probability {f.probability:.2f} (threshold {f.threshold:.2f}), "
            f"{f.severity} severity{flag}"
        )
    if not detected:
        lines.append(f"- {NO_FINDING}.")
    lines.append(f"Impression: {impression(findings, untrained=model.untrained, outside_population=outside_population)}")
    shown = "routine (outside the validated population)" if outside_population else triage(findings)
    lines.append(f"Triage: {shown}. Confidence: {confidence:.2f}.")
    lines.append(f"Model: {model.name} (version {model.version}).")
    lines.append(DISCLAIMER)
    return "\n".join(lines)

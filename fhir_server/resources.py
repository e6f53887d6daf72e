"""Analysis -> FHIR R4 resources (DiagnosticReport, Observation, heatmap Media + Binary, Device,
Provenance). Pure functions: no I/O, no storage, no HTTP.

Ids are assigned here, up front, so every reference is final before anything is written:
- deterministic (uuid5) for what re-analysis must *version* rather than duplicate: the
  DiagnosticReport, its Observations and heatmap Media are keyed by (input, model name, model
  version[, label]); the Device by (model name, model version). Writing them again at the same
  id makes a new version, so history keeps every run and nothing is silently overwritten.
- random (uuid4) for what is immutable per run: the heatmap PNG Binary and the Provenance.

Every builder validates its output with fhir.resources.R4B and returns JSON-ready dicts.
"""

from __future__ import annotations

import base64
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from fhir.resources.R4B.binary import Binary
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.media import Media
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.provenance import Provenance

import mappings
from ml.analysis import Analysis, Finding, ModelInfo

Json = dict[str, Any]

# Identifier systems of resources this server generates (stable: clients search by them).
ANALYSIS_ID_SYSTEM = "http://cxr-fhir.org/fhir/identifier/analysis"
MODEL_ID_SYSTEM = "http://cxr-fhir.org/fhir/identifier/model-version"
_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "http://cxr-fhir.org/fhir/id")
UCUM = "http://unitsofmeasure.org"


@dataclass(frozen=True)
class AnalysisInput:
    """What was analysed, as FHIR sees it."""

    reference: str  # "Media/<id>" or "ImagingStudy/<id>"
    subject: Json | None = None  # Reference dict copied from the input (Patient), if any
    effective: str | None = None  # acquisition time from the input (FHIR dateTime), if known
    views: tuple[str, ...] = ()  # every view of the exam (skipped laterals too): picks the LOINC code


@dataclass(frozen=True)
class ImageResult:
    """One analysed image; a Media gives one, a study gives one per frontal CR/DX instance."""

    analysis: Analysis
    instance_uid: str | None = None  # SOPInstanceUID when it came from DICOMweb
    view: str | None = None  # ViewPosition as recorded (PA, AP ...)

    @property
    def label(self) -> str:
        view = self.view or self.analysis.image.view_position or "view unknown"
        uid = self.instance_uid or self.analysis.image.sop_instance_uid
        return f"{view} image {uid}" if uid else f"{view} image"


@dataclass
class AnalysisResources:
    report: Json
    observations: list[Json]
    heatmap_media: list[Json]
    binaries: list[Json]
    device: Json
    notes: list[str] = field(default_factory=list)

    def outputs(self) -> list[Json]:
        """Everything the Provenance targets (the Device is the agent, not a target)."""
        return [*self.binaries, *self.heatmap_media, *self.observations, self.report]


def stable_id(*parts: str) -> str:
    return str(uuid.uuid5(_ID_NAMESPACE, "|".join(parts)))


def new_id() -> str:
    return str(uuid.uuid4())


def reference(resource: Json) -> str:
    return f"{resource['resourceType']}/{resource['id']}"


def _fhir_instant(dt: datetime) -> str:
    if dt.tzinfo is None:  # Analysis.created is documented UTC-aware; be safe anyway
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.isoformat(timespec="milliseconds")


def _meta() -> Json:
    return {"security": [mappings.ai_security().coding()]}


def _cc(codes: Sequence[mappings.Code], text: str | None = None) -> Json:
    out: Json = {"coding": [c.coding() for c in codes]}
    if text:
        out["text"] = text
    return out


def _probability(value: float) -> Json:
    return {"value": round(float(value), 4), "unit": "1", "system": UCUM, "code": "1"}


def _confidence_ext(value: float) -> Json:
    return {"url": mappings.ai_confidence_extension_url(), "valueDecimal": round(float(value), 4)}


def _validated(model: type, data: Json) -> Json:
    """Validate with fhir.resources R4B (types, cardinality, unknown elements) and re-serialise."""
    return model.model_validate(data).model_dump(mode="json")


# ---------------------------------------------------------------------------------- Device


def device_id(model: ModelInfo) -> str:
    return stable_id("device", model.name, model.version)


def device_identifier(model: ModelInfo) -> Json:
    return {"system": MODEL_ID_SYSTEM, "value": f"{model.name}@{model.version}"}


def build_device(model: ModelInfo) -> Json:
    notes = [
        "AI model: decision support only, output is preliminary and must be reviewed by a clinician."
    ]
    if model.untrained:
        notes.append("UNTRAINED placeholder model: its outputs carry no clinical meaning.")
    data: Json = {
        "resourceType": "Device",
        "id": device_id(model),
        "identifier": [device_identifier(model)],
        "status": "active",
        "manufacturer": "CXR-FHIR",
        "deviceName": [{"name": model.name, "type": "model-name"}],
        "type": {"text": "AI model"},
        "version": [
            {"type": {"text": "weights"}, "value": model.version},
            {"type": {"text": "software"}, "value": model.software_version},
            *_weights_versions(model),
        ],
        "note": [{"text": n} for n in notes],
    }
    if model.model_card_url:
        data["url"] = model.model_card_url
    return _validated(Device, data)


WEIGHTS_SHA256_SYSTEM = "http://cxr-fhir.org/fhir/identifier/model-weights-sha256"


def _weights_versions(model: ModelInfo) -> list[Json]:
    """Device.version entries naming the weights file(s) by sha256: the model's own, then each
    ensemble member's (component = the member's model identifier)."""
    out: list[Json] = []
    if model.weights_sha256:
        out.append({"type": {"text": "weights-sha256"}, "value": model.weights_sha256})
    for member in model.members:
        out.append({
            "type": {"text": "ensemble member weights-sha256"},
            "component": device_identifier(member),
            "value": member.weights_sha256 or member.version,
        })
    return out


def weights_entities(model: ModelInfo | None) -> list[Json]:
    """Provenance.entity entries for the weights that produced a result (each member of an ensemble)."""
    if model is None:
        return []
    out = []
    for m in (model.members or (model,)):
        if m.weights_sha256:
            out.append({"role": "source", "what": {
                "identifier": {"system": WEIGHTS_SHA256_SYSTEM, "value": m.weights_sha256},
                "display": f"weights of {m.name} ({m.version})",
            }})
    return out


# ---------------------------------------------------------------------------------- helpers


def report_identifier(input_ref: str, model: ModelInfo) -> Json:
    return {"system": ANALYSIS_ID_SYSTEM, "value": f"{input_ref}#{model.name}@{model.version}"}


def interpretation_code(finding: Finding) -> str:
    """POS/NEG by the model's own threshold; IND when within the documented band around it."""
    if abs(finding.probability - finding.threshold) < mappings.indeterminate_band():
        return "IND"
    return "POS" if finding.detected else "NEG"


def disclaimer(analysis: Analysis) -> str:
    """The disclaimer is the last paragraph of report_text (ml guarantees it ends with it)."""
    lines = [ln.strip() for ln in analysis.report_text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _png_size(png: bytes) -> tuple[int, int] | None:
    # IHDR is always first: 8-byte signature, 4 length, 4 "IHDR", then width and height.
    if len(png) >= 24 and png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR":
        width, height = struct.unpack(">II", png[16:24])
        return width, height
    return None


def _best_per_label(images: Sequence[ImageResult]) -> dict[str, tuple[Finding, ImageResult]]:
    """For a study, each finding is reported from the image where it is most probable."""
    best: dict[str, tuple[Finding, ImageResult]] = {}
    for img in images:
        for f in img.analysis.findings:
            if f.label not in best or f.probability > best[f.label][0].probability:
                best[f.label] = (f, img)
    return best


# ---------------------------------------------------------------------------------- builders


def build_observation(
    finding: Finding,
    source: ImageResult,
    images: Sequence[ImageResult],
    inp: AnalysisInput,
    ident: Json,
    device_ref: str,
) -> Json:
    mapping = mappings.finding(finding.label, finding.display)
    analysis = source.analysis
    interp = mappings.interpretation(interpretation_code(finding))
    notes = [f"Severity: {finding.severity}" + (" (critical finding)" if finding.critical else "")]
    if finding.regions:
        boxes = "; ".join(",".join(str(v) for v in r) for r in finding.regions)
        notes.append(f"Regions (x1,y1,x2,y2 in original image pixels): {boxes}")
    if len(images) > 1:
        notes.append(f"Study-level value taken from the most probable image: {source.label}")
    data: Json = {
        "resourceType": "Observation",
        "id": stable_id("observation", ident["value"], finding.label),
        "meta": _meta(),
        "extension": [_confidence_ext(analysis.confidence_score)],
        "identifier": [{"system": ANALYSIS_ID_SYSTEM, "value": f"{ident['value']}#{finding.label}"}],
        "status": "preliminary",
        "category": [_cc([mappings.observation_category()])],
        "code": _cc([*mapping.verified_codings, mapping.local], mapping.display),
        "effectiveDateTime": inp.effective or _fhir_instant(analysis.created),
        "issued": _fhir_instant(analysis.created),
        "valueQuantity": _probability(finding.probability),
        "referenceRange": [
            {
                "high": _probability(finding.threshold),
                "text": "Probabilities below the model's operating threshold are negative; "
                f"within {mappings.indeterminate_band()} of it the result is indeterminate.",
            }
        ],
        "device": {"reference": device_ref},
        "derivedFrom": [{"reference": inp.reference}],
        "note": [{"text": n} for n in notes],
    }
    if analysis.outside_population:
        # unvalidated for this population: no positive/negative call, only the probability
        notes.append("No interpretation: the film is outside the model's validated population.")
    else:
        data["interpretation"] = [_cc([interp])]
    if mapping.body_site:
        data["bodySite"] = _cc([mapping.body_site])
    if inp.subject:
        data["subject"] = inp.subject
    if len(images) > 1:
        part = mappings.local_part_code("instanceProbability")
        comps = []
        for img in images:
            f = next((x for x in img.analysis.findings if x.label == finding.label), None)
            if f is not None:
                comps.append({"code": _cc([part], img.label), "valueQuantity": _probability(f.probability)})
        data["component"] = comps
    return _validated(Observation, data)


def build_heatmap(
    finding: Finding, source: ImageResult, inp: AnalysisInput, ident: Json, device_ref: str
) -> tuple[Json, Json]:
    """A heatmap is a Binary (the PNG, immutable per run) plus a Media that points at it."""
    png = finding.heatmap_png or b""
    binary = _validated(
        Binary,
        {
            "resourceType": "Binary",
            "id": new_id(),
            "meta": _meta(),
            "contentType": "image/png",
            "data": base64.b64encode(png).decode("ascii"),
        },
    )
    title = f"Heatmap: {finding.display}"
    media: Json = {
        "resourceType": "Media",
        "id": stable_id("heatmap", ident["value"], finding.label),
        "meta": _meta(),
        "identifier": [{"system": ANALYSIS_ID_SYSTEM, "value": f"{ident['value']}#heatmap#{finding.label}"}],
        "status": "completed",
        "type": _cc([mappings.Code("http://terminology.hl7.org/CodeSystem/media-type", "image", "Image")]),
        "createdDateTime": _fhir_instant(source.analysis.created),
        "device": {"reference": device_ref},
        "content": {"contentType": "image/png", "url": f"Binary/{binary['id']}", "size": len(png), "title": title},
        "note": [{"text": f"Grad-CAM heatmap for {finding.display} on {source.label} of {inp.reference}"}],
    }
    size = _png_size(png)
    if size:
        media["width"], media["height"] = size
    if inp.subject:
        media["subject"] = inp.subject
    return _validated(Media, media), binary


def build_report(
    images: Sequence[ImageResult],
    inp: AnalysisInput,
    *,
    observations: Sequence[Json],
    heatmaps: Sequence[tuple[Json, str]],
    detected: Sequence[Finding],
    ident: Json,
    notes: Sequence[str] = (),
) -> Json:
    first = images[0].analysis
    created = max(img.analysis.created for img in images)
    if len(images) == 1:
        impression = first.impression
    else:
        impression = " ".join(f"[{img.label}] {img.analysis.impression}" for img in images)
    conclusion = " ".join(p for p in (impression, *notes, disclaimer(first)) if p)
    input_type = inp.reference.split("/", 1)[0]
    media_links: list[Json] = []
    if input_type == "Media":
        media_links.append({"comment": "Analysed image", "link": {"reference": inp.reference}})
    media_links += [{"comment": comment, "link": {"reference": reference(m)}} for m, comment in heatmaps]
    views = {mappings.canonical_view(v) for v in inp.views}
    views |= {mappings.canonical_view(img.view or img.analysis.image.view_position) for img in images}
    views.discard(None)
    code_kind = "two_views" if "LATERAL" in views and len(views) > 1 else "single_view"
    data: Json = {
        "resourceType": "DiagnosticReport",
        "id": stable_id("report", ident["value"]),
        "meta": _meta(),
        "extension": [_confidence_ext(min(img.analysis.confidence_score for img in images))],
        "identifier": [ident],
        "status": "preliminary",
        "category": [_cc(mappings.report_categories())],
        "code": _cc([mappings.report_code(code_kind)]),
        "effectiveDateTime": inp.effective or _fhir_instant(created),
        "issued": _fhir_instant(created),
        "result": [{"reference": reference(o)} for o in observations],
        "conclusion": conclusion,
        "presentedForm": [
            {
                "contentType": "text/plain; charset=utf-8",
                "title": f"AI report ({img.label})" if len(images) > 1 else "AI report",
                "data": base64.b64encode(img.analysis.report_text.encode("utf-8")).decode("ascii"),
            }
            for img in images
        ],
    }
    codes = []
    # outside the model's validated population there is no coded conclusion, as there is no
    # Observation.interpretation: receivers that triage on conclusionCode must not see it as urgent
    outside = any(img.analysis.outside_population for img in images)
    for f in () if outside else detected:
        m = mappings.finding(f.label, f.display)
        codes.append(_cc([*m.verified_codings, m.local], m.display))
    if codes:
        data["conclusionCode"] = codes
    if media_links:
        data["media"] = media_links
    if input_type == "ImagingStudy":
        data["imagingStudy"] = [{"reference": inp.reference}]
    if inp.subject:
        data["subject"] = inp.subject
    return _validated(DiagnosticReport, data)


def build_results(
    images: Sequence[ImageResult], inp: AnalysisInput, *, notes: Sequence[str] = ()
) -> AnalysisResources:
    """All output resources of one analysis (one Media, or the frontal images of one study).
    All images must come from the same model (one Analyzer serves one model)."""
    if not images:
        raise ValueError("build_results needs at least one analysed image")
    model = images[0].analysis.model
    device = build_device(model)
    device_ref = reference(device)
    ident = report_identifier(inp.reference, model)
    best = _best_per_label(images)
    # Keep ml's ranking (severity, then probability) for the first image's order.
    order = [f.label for img in images for f in img.analysis.findings]
    labels = list(dict.fromkeys(order))
    observations = [build_observation(best[lb][0], best[lb][1], images, inp, ident, device_ref) for lb in labels]
    heatmap_media: list[Json] = []
    binaries: list[Json] = []
    links: list[tuple[Json, str]] = []
    for lb in labels:
        finding, img = best[lb]
        if finding.heatmap_png:
            media, binary = build_heatmap(finding, img, inp, ident, device_ref)
            heatmap_media.append(media)
            binaries.append(binary)
            links.append((media, f"Heatmap: {finding.display}"))
    detected = [best[lb][0] for lb in labels if best[lb][0].detected]
    report = build_report(
        images, inp, observations=observations, heatmaps=links, detected=detected, ident=ident, notes=notes
    )
    return AnalysisResources(report, observations, heatmap_media, binaries, device, list(notes))


def warning_outcome_entry(warnings: Sequence[str]) -> Json:
    """A Bundle entry: an OperationOutcome with one warning issue per flag the analysis carries."""
    outcome = {
        "resourceType": "OperationOutcome",
        "id": new_id(),
        "issue": [{"severity": "warning", "code": "business-rule", "diagnostics": w} for w in warnings],
    }
    return {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": outcome}


_ACTIVITY = {"CREATE": "create", "UPDATE": "revise"}


def build_provenance(
    targets: Sequence[str], inp: AnalysisInput, device_ref: str, recorded: datetime, *, activity: str = "CREATE",
    model: ModelInfo | None = None,
) -> Json:
    """targets: references (ideally version-specific, "Observation/x/_history/2") written by this run."""
    data: Json = {
        "resourceType": "Provenance",
        "id": new_id(),
        "meta": _meta(),
        "target": [{"reference": t} for t in targets],
        "recorded": _fhir_instant(recorded),
        "activity": _cc(
            [mappings.Code("http://terminology.hl7.org/CodeSystem/v3-DataOperation", activity, _ACTIVITY[activity])]
        ),
        "agent": [
            {
                "type": _cc(
                    [
                        mappings.Code(
                            "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                            "performer",
                            "Performer",
                        )
                    ]
                ),
                "who": {"reference": device_ref},
            }
        ],
        "entity": [{"role": "source", "what": {"reference": inp.reference}}, *weights_entities(model)],
    }
    return _validated(Provenance, data)

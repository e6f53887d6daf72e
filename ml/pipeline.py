"""Analyzer: bytes (or a decoded XRayImage) -> Analysis. The only entry point fhir_server uses.

Steps: ingest.load_image -> out-of-distribution gate (refuses with NotChestXRay) -> preprocess ->
one forward pass -> findings (thresholds, severity, triage, confidence, report) -> explanations.

Explanations cost one small backward pass each (see ml/explain.py), so they are computed only where
they are used:
- `regions` for every *detected* finding, always (the FHIR mapping and the legacy API report them);
- heatmap PNGs only when `heatmaps=True`: for the detected findings, at most `heatmap_top_k` of them,
  or, when nothing is detected, for the `heatmap_top_k` most probable findings (their regions are
  filled in too, since they are computed anyway).

The forward pass runs with autograd enabled rather than under torch.inference_mode(): parameters
are frozen, so the only graph recorded is the small head after the cam layer, which Grad-CAM needs
(measured cost: within noise of an inference-mode pass).

Batching: `analyze_many` decodes and gates each request, stacks them into ONE forward pass and
finishes each; `analyze_bytes` is `analyze_many` of one, so a batch returns what single requests
return (the inference pool groups requests that arrive within a few ms, fhir_server/inference.py).

Engines (ml/engine.py): "torch" (Grad-CAM through autograd, as above) or "onnx" (ONNX Runtime;
heatmaps as CAM from the exported feature map in numpy where the head allows, else torch Grad-CAM
for the requests that need a map). With ONNX, the model's own OOD gate scores the pooled features
of the same forward pass when it can (`check_features`), instead of running the backbone twice.

Thread safety: the Analyzer holds no per-call mutable state. The model runs in eval mode with frozen
parameters; activations for Grad-CAM are captured per thread (explain.CamCapture). One Analyzer can
be shared by all workers of an inference pool.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ml import findings as fnd
from ml.analysis import Analysis, Finding, ModelInfo, OODResult
from ml.engine import OnnxEngine, build_engine, linear_cam_head
from ml.errors import NotChestXRay
from ml.explain import CamCapture, cam_regions, grad_cam, heatmap_png
from ml.image import ImageMetadata, XRayImage
from ml.models.base import LoadedModel, OODGate
from ml.population import outside_message
from ml.preprocess import Transform, preprocess


@dataclass
class _Prepared:
    """One request after decoding, the (unshared) OOD gate and preprocessing: ready for the forward pass."""

    image: XRayImage  # the working image (see working_image)
    original: ImageMetadata
    array: np.ndarray  # (1, S, S) model input
    transform: Transform
    ood: OODResult | None
    heatmaps: bool
    start: float
    warnings: list[str] = dataclasses.field(default_factory=list)


CamFn = Callable[[int], "np.ndarray | None"]  # model label index -> map (S, S) in 0..1, or None


class Analyzer:
    def __init__(
        self,
        model: LoadedModel,
        *,
        ood_gate: OODGate | None,
        max_bytes: int,
        max_pixels: int,
        heatmap_top_k: int = 3,
        engine: str = "torch",
        engine_cache_dir: Path | None = None,
        precision: str = "fp32",
        gate_mode: str = "refuse",
    ) -> None:
        if gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode must be one of {GATE_MODES}, not {gate_mode!r}")
        self._gate_mode = gate_mode
        self._model = model
        self._gate = ood_gate if ood_gate is not None else model.ood_gate
        self._max_bytes = max_bytes
        self._max_pixels = max_pixels
        self._top_k = max(1, heatmap_top_k)
        model.network.eval()
        # Frozen parameters: autograd then records only what follows the cam layer (explain.py).
        for param in model.network.parameters():
            param.requires_grad_(False)
        if model.members and engine == "onnx":  # an ensemble: one ONNX session per member (issue 11)
            from ml.engine_ensemble import EnsembleCamHead, EnsembleEngine

            self._engine = EnsembleEngine(model, cache_dir=engine_cache_dir, precision=precision)
            self._cam_head = EnsembleCamHead(self._engine)
        else:
            self._engine = build_engine(model, engine, cache_dir=engine_cache_dir, precision=precision)
            self._cam_head = linear_cam_head(model) if isinstance(self._engine, OnnxEngine) else None
        # The model's own gate can reuse the forward pass when it scores the pooled cam-layer
        # features (the bundled gate does): pooled = mean of the exported feature map.
        self._shared_gate = (
            self._cam_head is not None
            and not self._cam_head.relu_before_pool
            and self._gate is not None
            and self._gate is model.ood_gate
            and callable(getattr(self._gate, "check_features", None))
        )
        self._capture = CamCapture(model.cam_layer)
        self._closed = False

    @property
    def ready(self) -> bool:
        return not self._closed

    @property
    def model_info(self) -> ModelInfo:
        return self._model.info

    @property
    def labels(self) -> tuple[str, ...]:
        return self._model.labels

    @property
    def has_ood_gate(self) -> bool:
        return self._gate is not None

    @property
    def engine(self) -> str:
        """The engine actually serving ("onnx" or "torch" after a fallback)."""
        return self._engine.name

    @property
    def precision(self) -> str:
        return getattr(self._engine, "precision", "fp32")

    @property
    def numpy_cam(self) -> bool:
        """True when heatmaps come from the exported feature map (no torch on the hot path)."""
        return self._cam_head is not None

    def close(self) -> None:
        if not self._closed:
            self._capture.close()
            self._closed = True

    def analyze_bytes(self, data: bytes, *, heatmaps: bool = False, filename: str | None = None) -> Analysis:
        (result,) = self._analyze_many([(data, heatmaps, filename)])
        if isinstance(result, BaseException):
            raise result
        return result

    def analyze_image(self, image: XRayImage, *, heatmaps: bool = False) -> Analysis:
        prepared = self._prepare(image, heatmaps=heatmaps, start=time.perf_counter())
        (result,) = self._run([prepared])
        if isinstance(result, BaseException):
            raise result
        return result

    def analyze_many(self, requests: Sequence[tuple[bytes, bool, str | None]]) -> list[Analysis | BaseException]:
        """Several (data, heatmaps, filename) requests with ONE forward pass; results in order.

        Each result is what analyze_bytes would return for that request alone, or the exception it
        would raise (one bad image does not fail the others). A single request goes through
        analyze_bytes itself, so a subclass that wraps analyze_bytes sees every unbatched call.
        """
        if len(requests) == 1:
            data, heatmaps, filename = requests[0]
            try:
                return [self.analyze_bytes(data, heatmaps=heatmaps, filename=filename)]
            except Exception as exc:  # noqa: BLE001 - returned to that request's caller
                return [exc]
        return self._analyze_many(requests)

    def _analyze_many(self, requests: Sequence[tuple[bytes, bool, str | None]]) -> list[Analysis | BaseException]:
        results: list[Analysis | BaseException | None] = [None] * len(requests)
        ready: list[tuple[int, _Prepared]] = []
        for i, (data, heatmaps, filename) in enumerate(requests):
            start = time.perf_counter()
            try:
                ready.append((i, self._prepare(self._load(data, filename), heatmaps=heatmaps, start=start)))
            except Exception as exc:  # noqa: BLE001 - returned to that request's caller
                results[i] = exc
        if ready:
            for (i, _), result in zip(ready, self._run([p for _, p in ready]), strict=True):
                results[i] = result
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _load(self, data: bytes, filename: str | None) -> XRayImage:
        from ml.ingest import load_image  # the ingest package is owned separately; imported on use

        # target_size lets JPEG decode at a reduced DCT scale (short side still >= 2x the model input)
        return load_image(
            data,
            max_bytes=self._max_bytes,
            max_pixels=self._max_pixels,
            filename=filename,
            target_size=self._model.input_size,
        )

    def _prepare(self, image: XRayImage, *, heatmaps: bool, start: float) -> _Prepared:
        original = image.metadata
        image = working_image(image, self._model.input_size)
        ood = None
        warnings: list[str] = []
        if self._gate is not None and not self._shared_gate:
            ood = self._gate.check(image)
            warnings += self._gate_verdict(ood)
        array, transform = preprocess(image, self._model.input_size)
        return _Prepared(image, original, array, transform, ood, heatmaps, start, warnings)

    def _gate_verdict(self, ood: OODResult) -> list[str]:
        """Refuse (NotChestXRay) a failed gate, or in warn mode return the warning to show instead."""
        if ood.passed or self._gate_mode == "off":
            return []
        if self._gate_mode == "refuse":
            _refuse_unless_passed(ood)
        return [gate_warning(ood)]

    def _run(self, batch: list[_Prepared]) -> list[Analysis | BaseException]:
        if isinstance(self._engine, OnnxEngine):
            return self._run_onnx(batch)
        return self._run_torch(batch)

    def _run_torch(self, batch: list[_Prepared]) -> list[Analysis | BaseException]:
        model = self._model
        tensor = torch.from_numpy(np.stack([p.array for p in batch]))  # (N, 1, S, S)
        try:
            with self._capture.capture():
                probs = model.network(tensor)
                activation = self._capture.activation()
            values = probs.detach().numpy()

            def cam_for(row: int) -> CamFn:
                def cam(label_index: int) -> np.ndarray | None:
                    if activation is None:
                        return None
                    return grad_cam(probs[row, label_index], activation, model.input_size, retain_graph=True, row=row)

                return cam

            return [self._finish_safe(p, values[row], cam_for(row)) for row, p in enumerate(batch)]
        finally:
            self._capture.release()

    def _run_onnx(self, batch: list[_Prepared]) -> list[Analysis | BaseException]:
        assert isinstance(self._engine, OnnxEngine)
        probs, features = self._engine.forward(np.stack([p.array for p in batch]))
        results: list[Analysis | BaseException] = []
        for row, prepared in enumerate(batch):
            if self._shared_gate:
                try:
                    prepared.ood = self._gate.check_features(  # type: ignore[union-attr]
                        prepared.image, features[row].mean(axis=(1, 2)), self._engine.pooled)
                    prepared.warnings += self._gate_verdict(prepared.ood)
                except Exception as exc:  # noqa: BLE001 - this request's refusal only
                    results.append(exc)
                    continue
            head = self._cam_head
            if head is None:
                if self._needs_cam(prepared, probs[row]):  # no numpy CAM for this head: Grad-CAM in torch
                    results.extend(self._run_torch([prepared]))
                    continue
                cam_fn: CamFn = lambda _i: None  # noqa: E731 - nothing to explain
            else:
                feats, p_row = features[row], probs[row]
                cam_fn = lambda i, f=feats, p=p_row: head.cam(f, i, self._model.input_size, float(p[i]))  # noqa: E731
            results.append(self._finish_safe(prepared, probs[row], cam_fn))
        return results

    def _needs_cam(self, prepared: _Prepared, values: np.ndarray) -> bool:
        model = self._model
        return prepared.heatmaps or any(float(v) >= t for v, t in zip(values, model.thresholds, strict=True))

    def _finish_safe(self, prepared: _Prepared, values: np.ndarray, cam_fn: CamFn) -> Analysis | BaseException:
        try:
            return self._finish(prepared, values, cam_fn)
        except Exception as exc:  # noqa: BLE001 - this request's failure only
            return exc

    def _finish(self, prepared: _Prepared, values: np.ndarray, cam_fn: CamFn) -> Analysis:
        model = self._model
        image, original, transform = prepared.image, prepared.original, prepared.transform
        findings = fnd.make_findings(model.labels, model.displays, [float(v) for v in values], model.thresholds)
        detected = [f.label for f in findings if f.detected]
        if prepared.heatmaps:
            chosen = detected[: self._top_k] if detected else [f.label for f in findings[: self._top_k]]
        else:
            chosen = []
        targets = list(dict.fromkeys([*detected, *chosen]))  # ordered, unique
        explained: dict[str, tuple[list[list[int]], bytes | None]] = {}
        index = {label: i for i, label in enumerate(model.labels)}
        for label in targets:
            cam = cam_fn(index[label])
            if cam is None:
                continue
            regions = [_to_original(box, image, original) for box in cam_regions(cam, transform)]
            png = heatmap_png(image.pixels, cam, transform) if label in chosen else None
            explained[label] = (regions, png)

        findings = [_with_explanation(f, explained.get(f.label)) for f in findings]
        confidence = fnd.study_confidence(findings)
        warnings = list(prepared.warnings)
        outside = _outside_population(model, prepared.ood)
        if outside is not None:
            warnings.append(outside)
        return Analysis(
            findings=findings,
            # a film outside the validated population is never triaged urgent (its calls are unvalidated)
            triage="routine" if outside else fnd.triage(findings),
            confidence_score=confidence,
            impression=fnd.impression(findings, untrained=model.info.untrained, outside_population=outside is not None),
            report_text=fnd.report_text(
                findings, model=model.info, confidence=confidence, view_position=original.view_position,
                warnings=warnings, outside_population=outside is not None,
            ),
            warnings=tuple(warnings),
            outside_population=outside is not None,
            model=model.info,
            image=original,
            ood=prepared.ood,
            created=datetime.now(UTC),
            processing_time_ms=(time.perf_counter() - prepared.start) * 1000.0,
        )


# refuse: a failed gate is a NotChestXRay; warn: analysed and flagged; off: analysed, not flagged (the
# gate still runs when it is the model's own, for the population check that shares its features)
GATE_MODES = ("refuse", "warn", "off")


def gate_warning(ood: OODResult) -> str:
    """The flag a result carries when the gate failed but the site asked for analysis anyway."""
    check = f"{ood.check} check, " if ood.check else ""
    return (f"Not a frontal chest radiograph according to the out-of-distribution gate ({check}score "
            f"{ood.score:.3f} below {ood.threshold:.3f}): {_sentence(ood.reason or 'refused')} Analysed anyway "
            "because CXR_OOD_GATE=warn; the findings may be meaningless.")


def _outside_population(model: LoadedModel, ood: OODResult | None) -> str | None:
    """The outside-the-validated-population warning, or None when inside or unknown."""
    validated = model.validated_population
    pop = ood.population if ood is not None else None
    if validated is None or pop is None or pop.population == validated:
        return None
    return outside_message(model.info.name, validated, pop)


def _refuse_unless_passed(ood: OODResult) -> None:
    if not ood.passed:
        check = ood.check or "gate"
        raise NotChestXRay(
            _sentence(ood.reason or "the image does not look like a frontal chest radiograph")
            + f" Refused by the {check} check (score {ood.score:.3f}, threshold {ood.threshold:.3f}).",
            detail=f"OOD score {ood.score:.3f} below threshold {ood.threshold:.3f}",
            check=ood.check,
            score=ood.score,
            threshold=ood.threshold,
            compared_copies=ood.compared_copies,
        )


def _sentence(text: str) -> str:
    """'the image is blank' -> 'The image is blank.' (gate reasons are shown to users as-is)."""
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def working_image(image: XRayImage, size: int) -> XRayImage:
    """The image box-reduced by an integer factor while its short side stays >= 2 * size.

    Preprocessing (and the OOD gate's own preprocessing, and the heatmap background) would
    otherwise resample a multi-megapixel film several times; PIL's resize already box-reduces by
    such a factor internally (reducing_gap), so doing it once here changes the model input only at
    the crop edge (by less than one model pixel). Metadata keeps the original size; regions are
    scaled back in `_to_original`.
    """
    height, width = image.pixels.shape
    factor = min(height, width) // (2 * size)
    if factor < 2:
        return image
    reduced = Image.fromarray(np.ascontiguousarray(image.pixels, dtype=np.float32), mode="F").reduce(factor)
    return XRayImage(pixels=np.asarray(reduced, dtype=np.float32), metadata=image.metadata)


def _to_original(box: list[int], image: XRayImage, original: ImageMetadata) -> list[int]:
    """A box in `image.pixels` coordinates -> original pixels (they differ after a reduced decode)."""
    height, width = image.pixels.shape
    if (width, height) == (original.width, original.height):
        return box
    fx, fy = original.width / width, original.height / height
    x1, y1, x2, y2 = box
    return [
        max(0, int(np.floor(x1 * fx))),
        max(0, int(np.floor(y1 * fy))),
        min(original.width, int(np.ceil(x2 * fx))),
        min(original.height, int(np.ceil(y2 * fy))),
    ]


def _with_explanation(finding: Finding, explanation: tuple[list[list[int]], bytes | None] | None) -> Finding:
    if explanation is None:
        return finding
    regions, png = explanation
    return dataclasses.replace(finding, regions=regions, heatmap_png=png)

"""Analyzer: bytes (or a decoded XRayImage) -> Analysis. The only entry point fhir_server uses.

Steps: ingest.load_image -> out-of-distribution gate (refuses with NotChestXRay) -> preprocess ->
one forward pass -> findings (thresholds, severity, triage, confidence, report) -> explanations.

Explanations cost one small backward pass each (see ml/explain.py), so they are computed only where
they are used:
- `regions` for every *detected* finding, always (the FHIR mapping and the legacy API report them);
- heatmap PNGs only when `heatmaps=True`: for the detected findings, at most `heatmap_top_k` of them,
  or, when nothing is detected, for the `heatmap_top_k` most probable findings (their regions are
  filled in too, since they are computed anyway).

Thread safety: the Analyzer holds no per-call mutable state. The model runs in eval mode with frozen
parameters; activations for Grad-CAM are captured per thread (explain.CamCapture). One Analyzer can
be shared by all workers of an inference pool.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime

import numpy as np
import torch
from PIL import Image

from ml import findings as fnd
from ml.analysis import Analysis, Finding, ModelInfo
from ml.errors import NotChestXRay
from ml.explain import CamCapture, cam_regions, grad_cam, heatmap_png
from ml.image import ImageMetadata, XRayImage
from ml.models.base import LoadedModel, OODGate
from ml.preprocess import preprocess


class Analyzer:
    def __init__(
        self,
        model: LoadedModel,
        *,
        ood_gate: OODGate | None,
        max_bytes: int,
        max_pixels: int,
        heatmap_top_k: int = 3,
    ) -> None:
        self._model = model
        self._gate = ood_gate if ood_gate is not None else model.ood_gate
        self._max_bytes = max_bytes
        self._max_pixels = max_pixels
        self._top_k = max(1, heatmap_top_k)
        model.network.eval()
        # Frozen parameters: autograd then records only what follows the cam layer (explain.py).
        for param in model.network.parameters():
            param.requires_grad_(False)
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

    def close(self) -> None:
        if not self._closed:
            self._capture.close()
            self._closed = True

    def analyze_bytes(self, data: bytes, *, heatmaps: bool = False, filename: str | None = None) -> Analysis:
        start = time.perf_counter()
        from ml.ingest import load_image  # the ingest package is owned separately; imported on use

        # target_size lets JPEG decode at a reduced DCT scale (short side still >= 2x the model input)
        image = load_image(
            data,
            max_bytes=self._max_bytes,
            max_pixels=self._max_pixels,
            filename=filename,
            target_size=self._model.input_size,
        )
        return self._analyze(image, heatmaps=heatmaps, start=start)

    def analyze_image(self, image: XRayImage, *, heatmaps: bool = False) -> Analysis:
        return self._analyze(image, heatmaps=heatmaps, start=time.perf_counter())

    def _analyze(self, image: XRayImage, *, heatmaps: bool, start: float) -> Analysis:
        model = self._model
        original = image.metadata
        image = working_image(image, model.input_size)
        ood = None
        if self._gate is not None:
            ood = self._gate.check(image)
            if not ood.passed:
                raise NotChestXRay(
                    ood.reason or "The image does not look like a frontal chest radiograph.",
                    detail=f"OOD score {ood.score:.3f} below threshold {ood.threshold:.3f}",
                )

        array, transform = preprocess(image, model.input_size)
        tensor = torch.from_numpy(array).unsqueeze(0)  # (1, 1, S, S)
        try:
            with self._capture.capture():
                probs = model.network(tensor)
                activation = self._capture.activation()
            values = probs[0].detach().tolist()
            findings = fnd.make_findings(model.labels, model.displays, values, model.thresholds)

            detected = [f.label for f in findings if f.detected]
            if heatmaps:
                chosen = detected[: self._top_k] if detected else [f.label for f in findings[: self._top_k]]
            else:
                chosen = []
            targets = list(dict.fromkeys([*detected, *chosen]))  # ordered, unique
            explained: dict[str, tuple[list[list[int]], bytes | None]] = {}
            if activation is not None and targets:
                index = {label: i for i, label in enumerate(model.labels)}
                for n, label in enumerate(targets):
                    cam = grad_cam(
                        probs[0, index[label]], activation, model.input_size, retain_graph=n < len(targets) - 1
                    )
                    if cam is None:
                        continue
                    regions = [_to_original(box, image, original) for box in cam_regions(cam, transform)]
                    png = heatmap_png(image.pixels, cam, transform) if label in chosen else None
                    explained[label] = (regions, png)
        finally:
            self._capture.release()

        findings = [_with_explanation(f, explained.get(f.label)) for f in findings]
        confidence = fnd.study_confidence(findings)
        return Analysis(
            findings=findings,
            triage=fnd.triage(findings),
            confidence_score=confidence,
            impression=fnd.impression(findings, untrained=model.info.untrained),
            report_text=fnd.report_text(
                findings, model=model.info, confidence=confidence, view_position=original.view_position
            ),
            model=model.info,
            image=original,
            ood=ood,
            created=datetime.now(UTC),
            processing_time_ms=(time.perf_counter() - start) * 1000.0,
        )


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

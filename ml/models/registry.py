"""Model names -> loaders. The only way the rest of the code obtains a LoadedModel.

Loaders are imported lazily so that asking for the small untrained model never imports
torchxrayvision, and so that a model family whose module is missing fails with ModelUnavailable
instead of breaking the import of this module.
"""

from __future__ import annotations

from pathlib import Path

from ml.errors import ModelUnavailable
from ml.models.base import LoadedModel
from ml.version import package_version

BUNDLED = "cxr:pneumonia-v1"
UNTRAINED = "cxr:untrained-demo"

_XRV_NAMES = (
    "xrv:densenet121-res224-all",
    "xrv:densenet121-res224-nih",
    "xrv:densenet121-res224-pc",
    "xrv:densenet121-res224-chex",
    "xrv:densenet121-res224-rsna",
    "xrv:densenet121-res224-mimic_nb",
    "xrv:densenet121-res224-mimic_ch",
    "xrv:resnet50-res512-all",
)


def software_version() -> str:
    installed = package_version(default="")
    return f"cxr-fhir {installed}" if installed else "cxr-fhir (source)"


def available_models() -> tuple[str, ...]:
    """Every name load_model accepts (whether or not its weights are present)."""
    return (BUNDLED, *_XRV_NAMES, UNTRAINED)


def load_model(name: str, *, weights_dir: Path) -> LoadedModel:
    """Load a model by registry name. Raises ModelUnavailable with an actionable message."""
    if name.startswith("ensemble:"):  # ensemble:<name>,<name>,... of any names below (issue 11)
        from ml.models.ensemble import load_ensemble

        return load_ensemble(name, weights_dir=Path(weights_dir), load_member=load_model)
    if name == BUNDLED:
        try:
            from ml.models.bundled import load_bundled
        except ImportError as exc:
            raise ModelUnavailable(
                f"Model {name!r} is not available in this installation ({exc}). "
                f"Use CXR_MODEL={UNTRAINED} or an xrv:* model meanwhile."
            ) from exc
        return load_bundled(name)
    if name in _XRV_NAMES:
        from ml.models.xrv import load_xrv

        return load_xrv(name, weights_dir=Path(weights_dir))
    if name == UNTRAINED:
        from ml.models.untrained import load_untrained

        return load_untrained(name)
    raise ModelUnavailable(
        f"Unknown model {name!r}. Known models: {', '.join(available_models())}, "
        "and ensemble:<name>,<name>,... of them"
    )

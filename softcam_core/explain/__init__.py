"""Saliency maps: SoftCAM evidence maps beside every post-hoc method, and CasCAM (contract).

``explain(model, x, method, target=None, **options) -> Tensor (B, H, W)`` for ``method`` in
:data:`METHODS` (the model methods :data:`BASE_METHODS` and the model-free
:data:`SANITY_METHODS`) or ``"cascam:<base>"``; :func:`model_randomisation_test` is the
Adebayo et al. (2018) sanity check. See docs/explain.md.
"""

from softcam_core.explain.cascam import THRESHOLDS, CascadeResult, cascam
from softcam_core.explain.fused import FUSABLE_METHODS, FusedForward, forward_with_cams
from softcam_core.explain.guard import model_lock
from softcam_core.explain.layers import ExplainError, resolve_target_layer
from softcam_core.explain.methods import (
    BASE_METHODS,
    CASCAM_PREFIX,
    METHODS,
    SIGNED_METHODS,
    contrast_evidence,
    explain,
    file_safe_name,
    is_method,
    method_problem,
    resolve_targets,
)
from softcam_core.explain.sanity import (
    SANITY_METHODS,
    RandomisationResult,
    model_randomisation_test,
    randomisation_units,
    randomise_top_layers,
)

__all__ = [
    "BASE_METHODS",
    "CASCAM_PREFIX",
    "METHODS",
    "SANITY_METHODS",
    "SIGNED_METHODS",
    "THRESHOLDS",
    "CascadeResult",
    "RandomisationResult",
    "ExplainError",
    "FUSABLE_METHODS",
    "FusedForward",
    "cascam",
    "contrast_evidence",
    "explain",
    "forward_with_cams",
    "file_safe_name",
    "is_method",
    "method_problem",
    "model_lock",
    "model_randomisation_test",
    "randomisation_units",
    "randomise_top_layers",
    "resolve_target_layer",
    "resolve_targets",
]

"""Saliency maps: SoftCAM evidence maps beside every post-hoc method, and CasCAM (contract).

``explain(model, x, method, target=None, **options) -> Tensor (B, H, W)`` for ``method`` in
:data:`METHODS` (the model methods :data:`BASE_METHODS` and the model-free
:data:`SANITY_METHODS`) or ``"cascam:<base>"``; :func:`method_spec` says what a method is (title,
signed, slow, gradients, pixel-level, implementation); :func:`model_randomisation_test` is the
Adebayo et al. (2018) sanity check. See docs/explain.md.

Modules: ``specs`` (the registry), ``api`` (``explain``), ``methods`` (model methods), ``cascam``,
``sanity`` (model-free maps), ``randomisation``, ``fused`` (one forward pass for the Review page).
"""

from softcam_core.explain.api import explain
from softcam_core.explain.cascam import THRESHOLDS, CascadeResult, cascam
from softcam_core.explain.fused import FUSABLE_METHODS, FusedForward, forward_with_cams
from softcam_core.explain.guard import model_lock
from softcam_core.explain.layers import ExplainError, resolve_target_layer
from softcam_core.explain.methods import contrast_evidence, resolve_targets
from softcam_core.explain.randomisation import (
    RandomisationResult,
    model_randomisation_test,
    randomisation_units,
    randomise_top_layers,
)
from softcam_core.explain.specs import (
    BASE_METHODS,
    CASCAM_PREFIX,
    METHODS,
    SANITY_METHODS,
    SIGNED_METHODS,
    SPECS,
    MethodSpec,
    cascam_methods,
    file_safe_name,
    is_method,
    method_problem,
    method_spec,
    method_title,
)

__all__ = [
    "BASE_METHODS",
    "CASCAM_PREFIX",
    "METHODS",
    "SANITY_METHODS",
    "SIGNED_METHODS",
    "SPECS",
    "THRESHOLDS",
    "CascadeResult",
    "RandomisationResult",
    "ExplainError",
    "FUSABLE_METHODS",
    "FusedForward",
    "MethodSpec",
    "cascam",
    "cascam_methods",
    "contrast_evidence",
    "explain",
    "forward_with_cams",
    "file_safe_name",
    "is_method",
    "method_problem",
    "method_spec",
    "method_title",
    "model_lock",
    "model_randomisation_test",
    "randomisation_units",
    "randomise_top_layers",
    "resolve_target_layer",
    "resolve_targets",
]

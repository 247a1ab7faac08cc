"""Saliency maps: SoftCAM evidence maps beside every post-hoc method, and CasCAM (contract).

``explain(model, x, method, target=None, **options) -> Tensor (B, H, W)`` for ``method`` in
:data:`METHODS` or ``"cascam:<base>"``. See docs/explain.md.
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
    explain,
    file_safe_name,
    is_method,
    resolve_targets,
)

__all__ = [
    "BASE_METHODS",
    "CASCAM_PREFIX",
    "METHODS",
    "SIGNED_METHODS",
    "THRESHOLDS",
    "CascadeResult",
    "ExplainError",
    "FUSABLE_METHODS",
    "FusedForward",
    "cascam",
    "explain",
    "forward_with_cams",
    "file_safe_name",
    "is_method",
    "model_lock",
    "resolve_target_layer",
    "resolve_targets",
]

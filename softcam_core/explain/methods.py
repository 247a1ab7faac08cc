"""The model methods behind ``explain(model, x, method, target=None, **options)``.

Native maps (``softcam``, ``cam``) are computed here; every post-hoc method is computed by its
library (torchcam, captum, grad-cam), not rewritten. The only post-processing is bilinear
resizing to the input resolution (and, for captum's input-space attributions, the channel sum
that turns (B, 3, H, W) attributions into a map). Values stay raw: no normalisation here (the
UI and metrics normalise as they need). See docs/explain.md for each method's parameters,
layer and sign convention.

This module computes the model methods (:func:`explain_model`); :func:`softcam_core.explain.explain`
(:mod:`softcam_core.explain.api`) adds CasCAM and the model-free sanity maps, and the names and
properties of every method live in :mod:`softcam_core.explain.specs`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from softcam_core.explain.guard import autograd_from, eval_locked, guarded, inference_weights, model_lock
from softcam_core.explain.layers import ExplainError, cam_head, resolve_target_layer
from softcam_core.explain.specs import BASE_METHODS, GRADIENT_METHODS, method_problem

# captum announces, on every GuidedBackprop call, that it hooks the ReLUs (and removes the hooks):
# not news here; silenced around that call only (a filter set at import would change the caller's warnings)
_RELU_HOOK_WARNING = "Setting backward hooks on ReLU activations"

IG_DEFAULT_STEPS = 50
# masked / ablated inputs per forward pass (the libraries' default is 32 for both); docs/explain.md.
# Score-CAM: 128 masked inputs of up to 224 x 224 px per pass (fewer, larger passes: faster on CPU
# and CUDA), fewer for larger inputs so a pass holds at most 128 x 224^2 input pixels, never
# below the library's 32
SCORECAM_BATCH_PIXELS = 128 * 224 * 224
SCORECAM_MIN_BATCH = 32
ABLATIONCAM_DEFAULT_BATCH = 32
# integrated gradients: at most this many input pixels (steps x images x H x W) per internal batch,
# i.e. all 50 steps of one 224 px image at once (fastest: fewer, larger passes) while a 512 px
# image or a batch is split so the activations kept for the backward pass stay bounded
IG_PIXELS_PER_BATCH = 50 * 224 * 224


def _scorecam_batch(x: torch.Tensor) -> int:
    """Masked inputs per Score-CAM forward for input ``x`` (B, 3, H, W); see SCORECAM_BATCH_PIXELS."""
    return max(SCORECAM_MIN_BATCH, SCORECAM_BATCH_PIXELS // (x.shape[-2] * x.shape[-1]))


@contextlib.contextmanager
def _fast_layout(
    x: torch.Tensor, model: nn.Module, fold_batchnorm: bool = False, keep: nn.Module | None = None
) -> Iterator[torch.Tensor]:
    """On CPU, run ``model`` with channels-last conv weights and input while inside (put back after).

    For the methods with tens to hundreds of forward passes per map (Score-CAM, integrated
    gradients): oneDNN's channels-last convolutions are 1.2-1.3x faster on CPU, and the one weight
    copy per call is small beside those passes. On CUDA, fp32 channels-last was slower (0.92x), so
    the layout stays there. ``fold_batchnorm``: also fold each eval-mode batch norm into the
    convolution before it (``guard.inference_weights``), except a pair with ``keep`` (a hooked target
    layer: its output must stay the unfolded one). Yields the input to use.
    """
    cpu = x.device.type == "cpu"
    if not cpu and not fold_batchnorm:
        yield x
        return
    with inference_weights(model, channels_last=cpu, fold_probe=x if fold_batchnorm else None, keep=keep):
        yield x.contiguous(memory_format=torch.channels_last) if cpu else x


def resolve_targets(target: Any, batch: int, num_classes: int | None = None) -> list[int] | None:
    """Per-image class indices from ``None`` (predicted; returns None), an int, or a length-``batch`` sequence.

    Raises:
        ValueError: a sequence of another length (never truncated or broadcast), a non-integer,
            or an index outside ``[0, num_classes)``.
    """
    if target is None:
        return None
    if isinstance(target, torch.Tensor):
        target = target.tolist() if target.ndim else int(target.item())
    if isinstance(target, np.ndarray):
        target = target.tolist() if target.ndim else int(target.item())
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        targets = [int(target)] * batch
    elif isinstance(target, Sequence) and not isinstance(target, str):
        if len(target) != batch:
            raise ValueError(f"target has {len(target)} entries for a batch of {batch} images; give one per image")
        if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) for t in target):
            raise ValueError(f"targets must be class indices (int), got {list(target)!r}")
        targets = [int(t) for t in target]
    else:
        raise ValueError(f"target must be None, a class index or one index per image, got {target!r}")
    if num_classes is not None:
        bad = [t for t in targets if not 0 <= t < num_classes]
        if bad:
            raise ValueError(f"target class {bad[0]} outside 0..{num_classes - 1}")
    return targets


def num_classes_of(model: nn.Module) -> int | None:
    """Number of classes when the model says so (SoftCAMNet / BaselineNet / torchvision heads), else None."""
    value = getattr(model, "num_classes", None)
    if isinstance(value, int):
        return value
    for name in ("fc", "classifier", "head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
            if linears:
                return linears[-1].out_features
    return None


def _predicted(model: nn.Module, x: torch.Tensor) -> list[int]:
    with torch.no_grad():
        return model(x).argmax(1).tolist()


def _select(maps: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """maps (B, C, h, w), one class per image -> (B, h, w)."""
    index = torch.as_tensor(targets, device=maps.device)
    return maps[torch.arange(maps.shape[0], device=maps.device), index]


# ---------------------------------------------------------------------------------------- native
def _native(
    model: nn.Module, x: torch.Tensor, targets: list[int] | None, method: str,
    reduce: Callable[[torch.Tensor, list[int]], torch.Tensor],
) -> torch.Tensor:
    """``reduce(maps (B, C, h, w), targets) -> (B, h, w)`` of the evidence maps of the forward pass
    that makes the prediction (targets default to it); ``method`` names the caller in the error."""
    if not hasattr(model, "forward_with_maps"):
        raise ExplainError(
            f"'{method}' needs a SoftCAM net (forward_with_maps); {type(model).__name__} is a black box: "
            "use a post-hoc method"
        )
    # inference mode, as torchcam's gradient-free methods run: no autograd bookkeeping at all
    # (explain() clones the inference tensor it returns)
    with eval_locked(model), torch.inference_mode():
        logits, maps = model.forward_with_maps(x)
        if targets is None:
            targets = logits.argmax(1).tolist()
        return reduce(maps, targets)


def _softcam(model: nn.Module, x: torch.Tensor, targets: list[int] | None) -> torch.Tensor:
    """Target-class evidence map (signed) from the same forward pass as the prediction."""
    return _native(model, x, targets, "softcam", _select)


def _cam(model: nn.Module, x: torch.Tensor, targets: list[int] | None) -> torch.Tensor:
    """Classic CAM (Zhou et al. 2016): ``sum_k W[c, k] A_k`` on the last feature map, signed, no bias."""
    captured: list[torch.Tensor] = []
    with guarded(model, parameters=False), torch.inference_mode():
        # resolved under the model's lock: another thread's AblationCAM may have swapped the layer
        layer, linear, relu = cam_head(model)
        handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            logits = model(x)
        finally:
            handle.remove()
        features = F.relu(captured[0]) if relu else captured[0]
        if targets is None:
            targets = logits.argmax(1).tolist()
        weights = linear.weight[torch.as_tensor(targets, device=features.device)]  # (B, K)
        return torch.einsum("bk,bkhw->bhw", weights, features)


def contrast_evidence(maps: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
    """Contrast evidence ``A_c - mean_{k != c} A_k``: maps (B, C, h, w), one class per image -> (B, h, w).

    For two classes this is ``A_c - A_other``; its spatial mean is the logit difference
    ``logit_c - logit_other`` (the mean is linear), which is all a softmax over two classes depends
    on: adding any map to every class leaves the prediction unchanged, so only the difference is
    determined by the predictions (docs/explain.md, "Contrast map"). For C > 2 the mean over the
    other classes: the map's mean is ``logit_c - mean_{k != c} logit_k``, and it is equally invariant
    to a map added to every class. Signed.

    Raises:
        ExplainError: fewer than two classes.
    """
    classes = maps.shape[1]
    if classes < 2:
        raise ExplainError(f"a contrast map needs at least two classes; this model has {classes}")
    chosen = _select(maps, list(targets))
    return chosen - (maps.sum(1) - chosen) / (classes - 1)


def _softcam_contrast(model: nn.Module, x: torch.Tensor, targets: list[int] | None) -> torch.Tensor:
    """Target-class contrast evidence (signed) from the forward pass of the prediction (:func:`contrast_evidence`)."""
    return _native(model, x, targets, "softcam_contrast", contrast_evidence)


# ---------------------------------------------------------------------------------------- torchcam
def _torchcam(class_name: str, uses_gradients: bool) -> Callable[..., torch.Tensor]:
    def run(model: nn.Module, x: torch.Tensor, targets: list[int] | None, target_layer=None, **kwargs) -> torch.Tensor:
        many_passes = class_name == "ScoreCAM"
        fold_batchnorm = kwargs.pop("fold_batchnorm", None) if many_passes else False
        if many_passes:
            kwargs.setdefault("batch_size", _scorecam_batch(x))
            if fold_batchnorm is None:
                fold_batchnorm = x.device.type == "cpu"
        # torchcam differentiates with torch.autograd.grad w.r.t. the hooked activations: no weight
        # gradient is computed or written, so the guard leaves the parameters alone (cheaper)
        with guarded(model, parameters=False):
            # resolved under the model's lock: another thread's AblationCAM may have swapped the layer
            layer = resolve_target_layer(model, target_layer)
            layout = (_fast_layout(x, model, fold_batchnorm=fold_batchnorm, keep=layer) if many_passes
                      else contextlib.nullcontext(x))
            with layout as x:
                cams = _torchcam_maps(class_name, uses_gradients, model, x, targets, layer, kwargs)
        return cams[0]

    run.__name__ = f"torchcam_{class_name}"
    return run


def _torchcam_maps(class_name: str, uses_gradients: bool, model: nn.Module, x: torch.Tensor,
                   targets: list[int] | None, layer: nn.Module, kwargs: dict) -> list[torch.Tensor]:
    """torchcam's documented usage: one forward with the extractor's hooks, then the extractor."""
    from torchcam import methods as torchcam_methods

    extractor = getattr(torchcam_methods, class_name)(model, target_layer=layer, **kwargs)
    try:
        # gradient-free methods run under inference mode (torchcam's documented usage): no
        # autograd bookkeeping for any of their forward passes; the gradient methods need the
        # gradient at the hooked layer only, so the graph starts there (guard.autograd_from)
        with autograd_from(layer) if uses_gradients else torch.inference_mode():
            scores = model(x.detach())
            class_idx = targets if targets is not None else scores.argmax(1).tolist()
            if uses_gradients:
                return extractor(class_idx=class_idx, scores=scores, normalized=False)
            return extractor(class_idx=class_idx, normalized=False)
    finally:
        extractor.remove_hooks()


# ---------------------------------------------------------------------------------------- grad-cam
def _pytorch_grad_cam(class_name: str, uses_gradients: bool) -> Callable[..., torch.Tensor]:
    def run(model: nn.Module, x: torch.Tensor, targets: list[int] | None, target_layer=None, **kwargs) -> torch.Tensor:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if class_name == "AblationCAM":
            kwargs.setdefault("batch_size", ABLATIONCAM_DEFAULT_BATCH)
            # the library's default AblationLayer() is one instance shared by every call: use our own
            kwargs.setdefault("ablation_layer", _ablation_layer())
        # grad-cam's gradient methods call model.zero_grad() and loss.backward(): parameters are
        # frozen and their .grad restored; the gradient-free ones run under inference mode, where
        # no gradient can be computed or written, so the guard leaves the parameters alone
        with guarded(model, parameters=uses_gradients):
            # resolved under the model's lock: another thread's AblationCAM may have swapped the layer
            layers = [] if class_name == "FullGrad" else [resolve_target_layer(model, target_layer)]
            cam = getattr(pytorch_grad_cam, class_name)(model=model, target_layers=layers, **kwargs)
            try:
                library_targets = None if targets is None else [ClassifierOutputTarget(t) for t in targets]
                # gradient-free methods: inference mode (no autograd bookkeeping in any forward pass)
                with torch.set_grad_enabled(True) if uses_gradients else torch.inference_mode():
                    # FullGrad makes its own input leaf (compute_input_gradient); others need an
                    # input that requires grad because the parameters are frozen by the guard
                    needs_input_grad = uses_gradients and class_name != "FullGrad"
                    maps = cam(input_tensor=x.detach().requires_grad_(needs_input_grad), targets=library_targets)
            finally:
                # not ``with cam:``: BaseCAM.__exit__ swallows IndexError
                cam.activations_and_grads.release()
        return torch.from_numpy(np.asarray(maps, dtype=np.float32))

    run.__name__ = f"grad_cam_{class_name}"
    return run


def _ablation_layer() -> nn.Module:
    """grad-cam's ``AblationLayer`` with its ablated values computed from one minimum per batch.

    The library's ``AblationLayer.__call__`` recomputes ``torch.min`` over the whole batch of
    activations (batch x K x h x w) once or twice for each of the batch's images, i.e. for every
    channel of the map: half the CPU time of an Ablation-CAM call on ResNet-18. The values it
    writes follow from the first minimum ``m``: 0 while ``m == 0``; otherwise image i's channel
    gets ``m_i - 1e7`` where ``m_0 = m`` and ``m_{i+1} = m_i - 1e7`` (the written value is the new
    minimum). This subclass writes exactly those values (same float32 arithmetic, same maps), with
    one reduction per batch. It is passed through the library's own ``ablation_layer=`` option.
    """
    from pytorch_grad_cam.ablation_layer import AblationLayer

    class OneMinimumAblationLayer(AblationLayer):
        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            output = self.activations
            minimum = torch.min(output)
            for i in range(output.size(0)):
                if minimum == 0:
                    output[i, self.indices[i], :] = 0  # the minimum stays 0
                else:
                    minimum = minimum - 1e7  # the library's ABLATION_VALUE, below every other value
                    output[i, self.indices[i], :] = minimum
            return output

    return OneMinimumAblationLayer()


# ---------------------------------------------------------------------------------------- captum
def _integrated_gradients(
    model: nn.Module,
    x: torch.Tensor,
    targets: list[int] | None,
    n_steps: int = IG_DEFAULT_STEPS,
    baseline: float | torch.Tensor = 0.0,
    internal_batch_size: int | None = None,
    integration: str = "gausslegendre",
    fold_batchnorm: bool | None = None,
) -> torch.Tensor:
    """captum IntegratedGradients; map = sum over colour channels of the attributions (signed).

    ``fold_batchnorm`` (default: on CPU only, where it was measured): run captum's passes with
    each eval-mode batch norm folded into the convolution before it (same function, see
    ``guard.inference_weights``).
    """
    from captum.attr import IntegratedGradients

    if internal_batch_size is None:
        pixels_per_step = x.shape[0] * x.shape[-2] * x.shape[-1]
        steps_per_batch = max(1, IG_PIXELS_PER_BATCH // pixels_per_step)
        # None = every step in one pass (captum's default); else whole steps x images per pass
        if steps_per_batch < n_steps:
            internal_batch_size = steps_per_batch * x.shape[0]
    if fold_batchnorm is None:
        fold_batchnorm = x.device.type == "cpu"
    # parameters frozen: no weight-gradient bookkeeping in the 50-step pass (the cost is per call)
    with guarded(model):
        if targets is None:  # decided by the model as it is, before any folding
            targets = _predicted(model, x)
        with _fast_layout(x, model, fold_batchnorm=fold_batchnorm) as x:
            if isinstance(baseline, torch.Tensor):
                baseline = baseline.to(x.device, x.dtype)
            with torch.enable_grad():
                attributions = IntegratedGradients(model).attribute(
                    x, baselines=baseline, target=targets, n_steps=n_steps,
                    internal_batch_size=internal_batch_size, method=integration,
                )
    return attributions.sum(1)


def _guided_backprop(model: nn.Module, x: torch.Tensor, targets: list[int] | None) -> torch.Tensor:
    """captum GuidedBackprop; map = sum over colour channels of the input gradients (signed)."""
    from captum.attr import GuidedBackprop

    # captum differentiates with torch.autograd.grad w.r.t. the input: parameters are never touched
    with guarded(model, parameters=False):
        if targets is None:
            targets = _predicted(model, x)
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_RELU_HOOK_WARNING)
            attributions = GuidedBackprop(model).attribute(x.detach().requires_grad_(True), target=targets)
    return attributions.sum(1)


_IMPLEMENTATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "softcam": _softcam,
    "softcam_contrast": _softcam_contrast,
    "cam": _cam,
    "gradcam": _torchcam("GradCAM", True),
    "gradcampp": _torchcam("GradCAMpp", True),
    "xgradcam": _torchcam("XGradCAM", True),
    "layercam": _torchcam("LayerCAM", True),
    "scorecam": _torchcam("ScoreCAM", False),
    "hirescam": _pytorch_grad_cam("HiResCAM", True),
    "eigencam": _pytorch_grad_cam("EigenCAM", False),
    "ablationcam": _pytorch_grad_cam("AblationCAM", False),
    "fullgrad": _pytorch_grad_cam("FullGrad", True),
    "integrated_gradients": _integrated_gradients,
    "guided_backprop": _guided_backprop,
}
assert tuple(_IMPLEMENTATIONS) == BASE_METHODS


def resize_to(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, H, W) by bilinear interpolation (``align_corners=False``); no-op at equal size."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def explain_model(
    model: nn.Module,
    x: torch.Tensor,
    method: str,
    target: int | Sequence[int] | None = None,
    **options: Any,
) -> torch.Tensor:
    """Maps (B, H, W) float32 on ``x``'s device of one model method (``method`` in :data:`BASE_METHODS`).

    What :func:`softcam_core.explain.explain` runs for a model method (and CasCAM for each stage);
    arguments, returns and errors as there.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"x must be a (B, 3, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if method not in _IMPLEMENTATIONS:
        raise ValueError(method_problem(method) or f"{method!r} is not a model method; use explain()")
    implementation = _IMPLEMENTATIONS[method]
    # the whole call under the model's (re-entrant) lock: reading the model's classes, device and
    # layers must not interleave with another thread's layer swap (AblationCAM)
    with model_lock(model):
        targets = resolve_targets(target, x.shape[0], num_classes_of(model))
        # gradient methods need autograd even when the caller runs under torch.inference_mode()
        with torch.inference_mode(False):
            weight = next(model.parameters(), None)
            if method in GRADIENT_METHODS and weight is not None and weight.is_inference():
                raise ExplainError(
                    f"{method!r} differentiates through the model, whose weights were created under "
                    "torch.inference_mode(); load the model outside inference mode"
                )
            inputs = x.detach().to(torch.device("cpu") if weight is None else weight.device, torch.float32)
            if inputs.is_inference():
                inputs = inputs.clone()
            try:
                maps = implementation(model, inputs, targets, **options)
            except TypeError as exc:
                if "unexpected keyword argument" in str(exc):
                    raise ValueError(f"{method}: {exc}") from None
                raise
            if maps.is_inference():  # a gradient-free method ran under inference mode: hand the caller
                maps = maps.clone()  # a normal tensor (in-place ops on inference tensors fail outside it)
    return resize_to(maps.detach().float(), tuple(x.shape[-2:])).to(x.device, torch.float32)



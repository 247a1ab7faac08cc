"""A shared cached model is left exactly as found: hooks, layers, modes, requires_grad, .grad, weights."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from softcam_core.explain import METHODS, SANITY_METHODS, explain
from softcam_core.explain.guard import HOOK_DICTS
from softcam_core.models import SoftCAMNet
from tests.plugins.explain import (
    Tripwire,
    hand_built_baseline,
    hand_built_softcam,
    hand_built_softcam_with_tripwire,
    square_image,
)

# methods that run the model (the sanity maps never call it)
LIBRARY_METHODS = [m for m in METHODS if m not in ("softcam", "cam") and m not in SANITY_METHODS]


def _x() -> torch.Tensor:
    return torch.stack([square_image([(8, 16, 8, 2.0)]), square_image([(20, 4, 8, 2.0)], seed=1)])


def _snapshot(model: torch.nn.Module) -> dict:
    """Everything a method could leave behind."""
    modules = list(model.named_modules())
    return {
        "modules": [(name, id(m), type(m)) for name, m in modules],
        "hooks": sum(len(getattr(m, d, {}) or {}) for _, m in modules for d in HOOK_DICTS),
        "hook_keys": [(name, d, tuple((getattr(m, d, {}) or {}).keys())) for name, m in modules for d in HOOK_DICTS],
        "training": [(name, m.training) for name, m in modules],
        "requires_grad": [(name, p.requires_grad) for name, p in model.named_parameters()],
        "grad_ids": [(name, id(p.grad) if p.grad is not None else None) for name, p in model.named_parameters()],
        "grads": {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        # channels-last runs must hand back the original storage and memory format
        "layout": [(name, t.data_ptr(), t.stride()) for name, t in [*model.named_parameters(), *model.named_buffers()]],
    }


def _assert_same(before: dict, after: dict) -> None:
    for key in ("modules", "hooks", "hook_keys", "training", "requires_grad", "grad_ids", "layout"):
        assert after[key] == before[key], key
    assert before["grads"].keys() == after["grads"].keys()
    for name, grad in before["grads"].items():
        assert torch.equal(after["grads"][name], grad), name
    for name, value in before["state"].items():
        assert torch.equal(after["state"][name], value), name


def _messy(model: torch.nn.Module) -> torch.nn.Module:
    """A model as a session might leave it: train mode, a frozen layer, stale .grad, a user hook."""
    model.train()
    model.features[0].bias.requires_grad_(False)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 0.25)
    model.features.register_forward_hook(lambda *_: None)
    model.register_forward_pre_hook(lambda *_: None)
    return model


@pytest.mark.parametrize("method", [*METHODS, "cascam:ablationcam"])
def test_successful_call_leaves_model_as_found(method):
    model = _messy(hand_built_baseline() if method == "cam" else hand_built_softcam())
    before = _snapshot(model)
    assert before["hooks"] == 2
    explain(model, _x(), method)
    _assert_same(before, _snapshot(model))
    assert model.training


@pytest.mark.parametrize("fail_on", [1, 3])
@pytest.mark.parametrize("method", LIBRARY_METHODS + ["softcam", "cascam:gradcam"])
def test_failure_mid_method_leaves_model_as_found(method, fail_on):
    """The tripwire raises on the n-th forward through the head: hooks registered, layer swapped, ..."""
    model = _messy(hand_built_softcam_with_tripwire(fail_on=None))
    tripwire = model.evidence[0]
    before = _snapshot(model)
    tripwire.fail_on, tripwire.calls = fail_on, 0
    try:
        explain(model, _x(), method, target=0)
    except RuntimeError as exc:
        assert "tripwire" in str(exc) or "tripwire" in str(exc.__cause__ or "")
        raised = True
    else:  # the method needs fewer forward passes than fail_on
        raised = False
    tripwire.fail_on = None
    _assert_same(before, _snapshot(model))
    if fail_on == 1:
        assert raised, f"{method} swallowed the failure"


def test_ablationcam_layer_swap_is_undone_after_a_failure():
    """AblationCAM swaps the target layer for an AblationLayer before its ablation passes (call 3)."""
    from pytorch_grad_cam.ablation_layer import AblationLayer

    model = hand_built_softcam_with_tripwire(fail_on=3)
    features = model.features
    seen_swapped = []
    original_forward = Tripwire.forward

    def spy(self, x):  # records what sits in model.features while the ablation passes run
        seen_swapped.append(isinstance(model._modules["features"], AblationLayer))
        return original_forward(self, x)

    model.evidence[0].forward = spy.__get__(model.evidence[0])
    with pytest.raises(RuntimeError, match="tripwire"):
        explain(model, _x(), "ablationcam", target=0)
    assert seen_swapped[-1] is True, "the failure must happen while the layer is swapped"
    assert model.features is features
    assert not any(isinstance(m, AblationLayer) for m in model.modules())
    model.evidence[0].fail_on = None
    torch.testing.assert_close(model(_x()), hand_built_softcam()(_x()))


def test_grad_cam_index_error_is_not_swallowed():
    """grad-cam's context manager swallows IndexError; explain must not (bad layer -> clear error)."""
    model = hand_built_softcam()
    with pytest.raises(ValueError):
        explain(model, _x(), "hirescam", target=[0, 7])


def test_concurrent_calls_give_the_serial_maps():
    model = hand_built_softcam()
    x = _x()
    methods = ["gradcam", "scorecam", "integrated_gradients", "ablationcam", "guided_backprop", "softcam", "fullgrad",
               "hirescam"]
    serial = {m: explain(model, x, m, target=[0, 1]) for m in methods}
    results: dict[tuple[int, str, int], torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def worker(index: int) -> None:
        try:
            start.wait()
            for repeat in range(2):
                for method in (methods if index == 0 else methods[::-1]):
                    results[(index, method, repeat)] = explain(model, x, method, target=[0, 1])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert len(results) == 2 * 2 * len(methods)
    for (index, method, repeat), maps in results.items():
        torch.testing.assert_close(maps, serial[method], rtol=0, atol=0, msg=f"{method} thread {index}")
    assert sum(len(getattr(m, d, {}) or {}) for m in model.modules() for d in HOOK_DICTS) == 0


def test_a_module_replaced_between_calls_is_kept():
    """The guard caches the module tree per model; a structure change must rebuild it, not be undone."""
    import copy

    model = _messy(hand_built_softcam())
    explain(model, _x(), "gradcam", target=0)
    replacement = copy.deepcopy(model.features)
    model.features = replacement
    replacement.register_forward_hook(lambda *_: None)
    before = _snapshot(model)
    explain(model, _x(), "scorecam", target=0)
    assert model.features is replacement
    _assert_same(before, _snapshot(model))


@pytest.mark.parametrize("activations", ["relu", "signed"])
def test_one_minimum_ablation_layer_writes_the_library_values(activations):
    """Our Ablation-CAM layer computes the minimum once per batch; the values must equal the library's."""
    from pytorch_grad_cam.ablation_layer import AblationLayer

    from softcam_core.explain.methods import _ablation_layer

    generator = torch.Generator().manual_seed(0)
    saved = torch.randn(2, 6, 3, 3, generator=generator)
    if activations == "relu":
        saved = saved.clamp(min=0)  # minimum 0: ablated channels become 0
    outputs = []
    for layer in (AblationLayer(), _ablation_layer()):
        layer.set_next_batch(input_batch_index=1, activations=saved, num_channels_to_ablate=4)
        layer.indices = [3, 0, 5, 2]
        outputs.append(layer(None).clone())
    assert torch.equal(outputs[0], outputs[1])
    ablated = outputs[1][torch.arange(4), torch.tensor([3, 0, 5, 2])]
    if activations == "relu":
        assert torch.all(ablated == 0)
    else:  # the library's cumulative -1e7 steps below the batch minimum
        minimum = saved[1].min()
        expected = torch.stack([minimum - 1e7 * (i + 1) for i in range(4)])
        torch.testing.assert_close(ablated.amax((1, 2)), expected, rtol=1e-6, atol=0)


class _SkipBlock(nn.Module):
    """A convolution whose output feeds its batch norm *and* a skip connection: must not be folded."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.relu(self.bn(y)) + y


def batchnorm_softcam(fail_on: int | None = None) -> SoftCAMNet:
    """Small SoftCAM net with conv + batch-norm pairs (random running statistics, one affine=False)
    and one non-foldable pair; a :class:`Tripwire` in front of the head."""
    generator = torch.Generator().manual_seed(3)
    features = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        _SkipBlock(4),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
        nn.AvgPool2d(4),
    )
    with torch.no_grad():
        for module in features.modules():
            if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)) and module.weight is not None:
                module.weight.copy_(0.5 * torch.randn(module.weight.shape, generator=generator) + 0.5)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.3 * torch.randn(4, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(4, generator=generator))
                if module.bias is not None:
                    module.bias.copy_(0.2 * torch.randn(4, generator=generator))
    return SoftCAMNet(features, nn.Sequential(Tripwire(fail_on), nn.Conv2d(4, 2, 1)), arch="hand-built").eval()


def test_batchnorm_fold_pairs_only_a_convolution_output_nothing_else_reads():
    from softcam_core.explain.guard import conv_bn_pairs

    model = batchnorm_softcam()
    assert conv_bn_pairs(model, _x()) == (("features.0", "features.1"), ("features.4", "features.5"))
    assert sum(len(getattr(m, d, {}) or {}) for m in model.modules() for d in HOOK_DICTS) == 0


@pytest.mark.parametrize("method", ["integrated_gradients", "scorecam"])
def test_batchnorm_fold_and_channels_last_leave_model_as_found(method):
    model = _messy(batchnorm_softcam())
    before = _snapshot(model)
    explain(model, _x(), method, target=[0, 1], **({"n_steps": 8} if method == "integrated_gradients" else {}))
    _assert_same(before, _snapshot(model))
    assert model.training


@pytest.mark.parametrize("fail_on", [1, 2])
def test_failure_inside_batchnorm_fold_leaves_model_as_found(fail_on):
    """Call 1 is the fold's probe pass (nothing swapped yet), call 2 the first integration pass."""
    model = _messy(batchnorm_softcam())
    before = _snapshot(model)
    tripwire = model.evidence[0]
    tripwire.fail_on, tripwire.calls = fail_on, 0
    with pytest.raises(RuntimeError, match="tripwire"):
        explain(model, _x(), "integrated_gradients", target=0, n_steps=4)
    tripwire.fail_on = None
    _assert_same(before, _snapshot(model))
    assert all(isinstance(model.features[i], nn.BatchNorm2d) for i in (1, 5))


def test_guard_removes_hooks_added_inside_and_puts_back_removed_ones():
    """Hook dictionaries are keyed by PyTorch's global handle counter: ids >= the entry value are new."""
    from softcam_core.explain.guard import guarded

    model = _messy(hand_built_softcam())
    before = _snapshot(model)
    for parameters in (True, False):
        with guarded(model, parameters=parameters):
            model.features[0].register_forward_hook(lambda *_: None)
            model.register_forward_hook(lambda *_: None, with_kwargs=True, always_call=True)
            model.evidence.register_full_backward_hook(lambda *_: None)
            model.features._forward_hooks.clear()  # a misbehaving library drops the user's hook
            torch.ones(1, requires_grad=True).register_hook(lambda g: g)  # a tensor hook moves the counter too
        _assert_same(before, _snapshot(model))


def test_folded_integrated_gradients_match_captum_called_directly():
    """Folding batch norms (CPU default) changes float rounding only: same maps as captum on the model as is."""
    from captum.attr import IntegratedGradients

    from softcam_core.explain.guard import _state

    model = batchnorm_softcam()
    x = _x()
    direct = IntegratedGradients(model).attribute(x, target=[0, 1], n_steps=16).sum(1)
    folded = explain(model, x, "integrated_gradients", target=[0, 1], n_steps=16)
    assert _state(model).conv_bn == (("features.0", "features.1"), ("features.4", "features.5"))
    unfolded = explain(model, x, "integrated_gradients", target=[0, 1], n_steps=16, fold_batchnorm=False)
    scale = float(direct.abs().max())
    assert scale > 1e-2  # not a trivially zero map
    torch.testing.assert_close(folded, direct, rtol=1e-4, atol=1e-5 * scale)  # rounding only
    torch.testing.assert_close(unfolded, direct, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("target_layer", [None, "features.1", "features.4"])
def test_folded_scorecam_keeps_the_hooked_layer(target_layer):
    """Score-CAM folds batch norms too (CPU), but never the pair holding the layer it hooks: that
    layer's output must be the unfolded one (a hooked conv followed by its batch norm, or the norm)."""
    model = batchnorm_softcam()
    options = {} if target_layer is None else {"target_layer": target_layer}
    folded = explain(model, _x(), "scorecam", target=[0, 1], **options)
    unfolded = explain(model, _x(), "scorecam", target=[0, 1], fold_batchnorm=False, **options)
    scale = float(unfolded.abs().max())
    assert scale > 1e-3
    torch.testing.assert_close(folded, unfolded, rtol=1e-4, atol=1e-5 * scale)  # rounding only

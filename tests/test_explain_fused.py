"""One forward pass for prediction, SoftCAM evidence and gradient CAMs (softcam_core.explain.fused),
and the Review session that uses it (softcam_core.ImageSession)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service import image_session
from service.image_session import ImageSession, MapStore
from softcam_core.explain import explain
from softcam_core.explain.fused import FUSABLE_METHODS, forward_with_cams
from softcam_core.models import build_model


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return {head: build_model("resnet18", num_classes=3, head=head).eval() for head in ("softcam", "baseline")}


def counting(model):
    """Counts forward passes of the model's feature extractor (a real hook, removed by the caller)."""
    calls = []
    handle = model.features.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("head", ["softcam", "baseline"])
@pytest.mark.parametrize("target", [None, 1, [2, 0]])
def test_fused_maps_equal_explain_for_every_fusable_method(nets, head, target):
    model = nets[head]
    x = torch.randn(2, 3, 80, 80, generator=torch.Generator().manual_seed(1))
    calls, handle = counting(model)
    try:
        fused = forward_with_cams(model, x, list(FUSABLE_METHODS), target=target)
    finally:
        handle.remove()
    assert len(calls) == 1  # one pass for the logits, the evidence and all four CAMs
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(fused.logits, logits, rtol=0, atol=1e-5)
    expected_targets = logits.argmax(1).tolist() if target is None else (
        [target] * 2 if isinstance(target, int) else target)
    assert fused.targets == expected_targets
    if head == "softcam":
        assert fused.maps.shape == (2, 3, 3, 3)
        torch.testing.assert_close(fused.maps.mean((2, 3)), fused.logits, rtol=0, atol=1e-5)
    else:
        assert fused.maps is None
    for method in FUSABLE_METHODS:
        reference = explain(model, x, method, target=expected_targets)
        assert fused.cams[method].shape == (2, 80, 80)
        torch.testing.assert_close(fused.cams[method], reference, rtol=0, atol=1e-6)


def test_fused_pass_leaves_model_and_grad_mode_as_found(nets):
    model = nets["softcam"]
    hooks_before = [len(m._forward_hooks) for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        forward_with_cams(model, torch.randn(1, 3, 64, 64), ["gradcam"])
        assert not torch.is_grad_enabled()
    forward_with_cams(model, torch.randn(1, 3, 64, 64), ["gradcam"])
    assert torch.is_grad_enabled()
    assert [len(m._forward_hooks) for m in model.modules()] == hooks_before
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="target"):
        forward_with_cams(model, torch.randn(1, 3, 64, 64), ["gradcam"], target=7)
    assert torch.is_grad_enabled() and [len(m._forward_hooks) for m in model.modules()] == hooks_before


def test_fused_pass_refuses_methods_that_need_their_own_passes(nets):
    with pytest.raises(ValueError, match="scorecam.*explain"):
        forward_with_cams(nets["softcam"], torch.randn(1, 3, 64, 64), ["gradcam", "scorecam"])


class DictStore(MapStore):
    """A persistent-store stand-in backed by a dict (the database adapter lives in pages/common.py)."""

    def __init__(self):
        self.items = {}

    def get(self, key):
        return self.items.get(key)

    def put(self, key, array, seconds):
        self.items[key] = (np.array(array), seconds)


def test_review_session_makes_prediction_evidence_and_gradcam_in_one_pass_then_reopens_without_one(
        nets, real_data):
    from softcam_core.imaging import load_image

    model = nets["softcam"]
    meta = {"classes": ["healthy", "mild", "severe"], "img_size": 96, "mean": [0.5] * 3, "std": [0.25] * 3}
    image = load_image(sorted((real_data / "fundus_kaggle_dr").rglob("*.png"))[0])
    store = DictStore()
    image_session._MAP_CACHE.clear()
    calls, handle = counting(model)
    try:
        first = ImageSession(model, meta, image, "fused-test", store=store)
        prediction = first.predict(with_methods=["gradcam", "scorecam"])  # scorecam: not fusable, ignored
        evidence = first.evidence_maps()
        gradcam = first.explain("gradcam", prediction.predicted)
        assert len(calls) == 1 and not gradcam.cached and not first.forward_was_cached
        assert not first.is_cached("scorecam", prediction.predicted)
        reference = explain(model, first.x, "gradcam", target=prediction.predicted)[0].numpy()
        np.testing.assert_allclose(gradcam.input_map, reference, atol=1e-6)
        softcam = explain(model, first.x, "softcam", target=1)[0].numpy()
        np.testing.assert_allclose(evidence[1].input_map, softcam, atol=1e-6)

        calls.clear()
        image_session._MAP_CACHE.clear()  # as after a restart: only the persistent store remains
        again = ImageSession(model, meta, image, "fused-test", store=store)
        assert again.predict(with_methods=["gradcam"]).predicted == prediction.predicted
        reopened = again.explain("gradcam", prediction.predicted)
        assert calls == [] and again.forward_was_cached and reopened.cached
        np.testing.assert_array_equal(reopened.input_map, gradcam.input_map)
        np.testing.assert_array_equal(again.evidence_maps()[2].image_map, evidence[2].image_map)
        np.testing.assert_allclose(again.predict().probabilities, prediction.probabilities, atol=1e-7)
    finally:
        handle.remove()


@pytest.mark.parametrize("head, method", [("softcam", "softcam"), ("softcam", "softcam_contrast"),
                                          ("softcam", "gradcam"), ("softcam", "guided_backprop"),
                                          ("baseline", "cam"), ("baseline", "gradcam")])
def test_review_session_maps_follow_the_selected_class_not_the_prediction(nets, real_data, head, method):
    """Every map and title is of the class asked for: a session that ignored ``target`` fails here."""
    from softcam_core.imaging import load_image

    model = nets[head]
    meta = {"classes": ["healthy", "mild", "severe"], "img_size": 64, "mean": [0.5] * 3, "std": [0.25] * 3}
    image = load_image(sorted((real_data / "fundus_kaggle_dr").rglob("*.png"))[0])
    image_session._MAP_CACHE.clear()
    session = ImageSession(model, meta, image, f"target-test-{head}", store=DictStore())
    predicted = session.predict(with_methods=["gradcam"]).predicted
    other = (predicted + 1) % 3
    chosen, default = session.explain(method, other), session.explain(method, predicted)
    assert chosen.target == other and chosen.target_name == meta["classes"][other]
    assert chosen.title.endswith(f"· {meta['classes'][other]}")
    reference = explain(model, session.x, method, target=other)[0].numpy()
    np.testing.assert_allclose(chosen.input_map, reference, atol=1e-5)
    assert not np.allclose(chosen.input_map, default.input_map, atol=1e-6)
    assert session.explain(method).target == predicted  # no target: the predicted class

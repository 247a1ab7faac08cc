"""Leave a shared model exactly as found after an explanation, even when a method raises.

Streamlit serves every session from one cached model, and the saliency libraries mutate the
model while they work: torchcam and grad-cam register forward hooks, captum's guided backprop
registers backward hooks on every ReLU, grad-cam calls ``model.eval()`` and ``model.zero_grad()``,
and grad-cam's AblationCAM swaps the target layer for an ``AblationLayer`` (and does not put it
back if it raises). :func:`guarded` snapshots what they touch and restores it in ``finally``:

* child-module structure of every module (undoes any layer swap),
* every module's hook dictionaries (removes any hook left behind),
* every module's ``training`` flag,
* every parameter's ``requires_grad`` flag and ``.grad`` tensor (the object itself), for the
  methods that can touch them (``parameters=True``, the default).

With ``parameters=True`` the parameters are frozen while inside (``requires_grad=False``): grad-cam
calls ``loss.backward()`` and ``model.zero_grad()``, and frozen parameters mean no weight gradient
is computed (less work) or written. torchcam and captum differentiate with ``torch.autograd.grad``
with respect to the input or hooked activations, which never computes, writes or zeroes a weight
gradient, so their calls pass ``parameters=False`` and skip the per-parameter work. The model
runs in eval mode (dropout off, batch-norm running statistics) whatever mode it was in.

Speed: the module list, each module's children and the submodules' hook dictionaries are cached
per model (weak-keyed, so a dropped model is freed) and revalidated on every call by comparing each
module's children with the cached copy (pointer comparisons); any structure change rebuilds the
cache. Hooks are tracked through PyTorch's global hook-handle counter (see :func:`guarded`), modes
only when some module is training. Per call on CPU (this machine, micro-benchmark): ~23 us for
ResNet-18 and ~46 us for ResNet-50 with ``parameters=False``, 63 / 146 us with; was 1.25 / 2.98 ms
before the cache (``eval_locked``: ~11 / 22 us).

Concurrency: hooks live on the shared model, so two explanations of the same model must not
overlap. Each model has one re-entrant lock (:func:`model_lock`); calls on the same model from
several threads run one after the other and give the same maps as serial calls. Calls on
different models run in parallel.
"""

from __future__ import annotations

import operator
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


class _ModelState:
    """Per-model lock and the cached module tree the guard snapshots (built once, revalidated per call).

    The root model itself is never stored here (only its submodules): the state lives in a
    ``WeakKeyDictionary`` keyed by the model, and a value that referenced its key would keep the
    model alive forever.
    """

    __slots__ = ("lock", "submodules", "children", "hook_dicts", "conv_bn", "scratch", "scratch_busy")

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.submodules: list[nn.Module] | None = None  # every module below the root, in modules() order
        self.children: list[dict] = []  # copies of each module's ``_modules`` (root first)
        self.hook_dicts: list[dict] = []  # the submodules' hook dictionaries, flattened
        # (conv name, batch-norm name) pairs that can be folded (see conv_bn_pairs); None = not probed
        self.conv_bn: tuple[tuple[str, str], ...] | None = None
        # parameter / buffer -> the tensor its faster copy is written into on each call (see
        # inference_weights): reusing the memory avoids fresh pages for tens of MB per call
        self.scratch: dict[torch.Tensor, torch.Tensor] = {}
        self.scratch_busy = False

    def modules(self, model: nn.Module) -> list[nn.Module]:
        """``list(model.modules())``, rebuilt only when some module's children changed since last time."""
        if self.submodules is not None:
            modules = [model, *self.submodules]
            # dict == compares values with identity first, so this is a per-module pointer check
            if all(map(operator.eq, map(_MODULES, modules), self.children)):
                return modules
        modules = list(model.modules())
        self.submodules = modules[1:]
        self.children = [dict(m._modules) for m in modules]
        self.hook_dicts = _hook_dicts(self.submodules)
        self.conv_bn = None
        self.scratch = {}
        return modules


def _hook_dicts(modules: list[nn.Module]) -> list[dict]:
    return [d for m in modules for name in HOOK_DICTS if (d := getattr(m, name, None)) is not None]


_GRAD = operator.attrgetter("grad")
_MODULES = operator.attrgetter("_modules")
_PARAMETERS = operator.attrgetter("_parameters")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_TRAINING = operator.attrgetter("training")

_STATES: "weakref.WeakKeyDictionary[nn.Module, _ModelState]" = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def _state(model: nn.Module) -> _ModelState:
    with _STATES_LOCK:
        state = _STATES.get(model)
        if state is None:
            state = _STATES[model] = _ModelState()
        return state


def model_lock(model: nn.Module) -> threading.RLock:
    """The per-model re-entrant lock that serialises explanations of ``model``."""
    return _state(model).lock


def _restore_children(modules: list[nn.Module], saved_children: list[dict]) -> None:
    for module, saved in zip(modules, saved_children):
        if module._modules != saved:
            module._modules.clear()
            module._modules.update(saved)


def _restore_training(modules: list[nn.Module], modes: list[bool]) -> None:
    for module, training in zip(modules, modes):
        if module.training is not training:
            module.training = training


@contextmanager
def channels_last_weights(model: nn.Module) -> Iterator[None]:
    """Hold ``model``'s 4-D parameters and buffers (conv weights) in channels-last while inside.

    Each tensor's ``.data`` is swapped for a channels-last copy and the original tensor object is
    put back in ``finally``, so the model leaves with its original storage, memory format and
    values (no copy back); ``Parameter`` objects, ``.grad`` and ``requires_grad`` are untouched.
    On CPU, oneDNN runs a convolution channels-last when its weight is, so every forward pass
    inside runs channels-last (1.2-1.3x for ResNets) with the same results up to rounding (~1e-6).
    Costs one copy of the conv weights per call: use it around methods that run many forwards.
    Call it under the model's lock (inside :func:`guarded`).
    """
    with inference_weights(model, channels_last=True):
        yield


def conv_bn_pairs(model: nn.Module, probe: torch.Tensor) -> tuple[tuple[str, str], ...]:
    """``(conv name, batch-norm name)`` for every ``BatchNorm2d`` that normalises a ``Conv2d``'s output alone.

    Found from one forward pass of ``probe`` (1, 3, H, W) with hooks (removed after) and the
    autograd graph: the batch norm's input must be the very tensor the convolution returned (same
    object, same ``grad_fn``: nothing in-place in between), each module runs once per forward, and
    the convolution's output has no other differentiable consumer (the batch norm's node is the
    only one in the graph that points at the convolution's node). Exactly ``nn.Conv2d`` /
    ``nn.BatchNorm2d`` (subclasses may change ``forward``). Consumers without a gradient (a
    comparison, ``.detach()``) are not visible in the graph; no torchvision model has one there.
    Cached per model (see :func:`inference_weights`); the cache is dropped when the module tree changes.
    """
    names: dict[nn.Module, str] = {}
    for name, module in model.named_modules():
        names.setdefault(module, name)
    convs = [m for m in names if type(m) is nn.Conv2d]
    norms = [m for m in names if type(m) is nn.BatchNorm2d]
    if not convs or not norms or any(t.is_inference() for m in (*convs, *norms) for t in _tensors(m)):
        return ()  # weights made under inference_mode cannot enter the probe's autograd graph
    calls: dict[nn.Module, int] = dict.fromkeys([*convs, *norms], 0)
    produced: dict[int, tuple[nn.Module, torch.Tensor, object]] = {}
    consumed: list[tuple[nn.Module, torch.Tensor, object]] = []

    def after_conv(module, _inputs, output):
        calls[module] += 1
        if isinstance(output, torch.Tensor):
            produced[id(output)] = (module, output, output.grad_fn)

    def before_norm(module, inputs):
        calls[module] += 1
        if inputs and isinstance(inputs[0], torch.Tensor):
            consumed.append((module, inputs[0], inputs[0].grad_fn))

    handles = [m.register_forward_hook(after_conv) for m in convs]
    handles += [m.register_forward_pre_hook(before_norm) for m in norms]
    try:
        with torch.enable_grad():
            output = model(probe[:1].detach().requires_grad_(True))
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(output, torch.Tensor) or output.grad_fn is None:
        return ()
    consumers: dict[object, int] = {}
    stack, seen = [output.grad_fn], {output.grad_fn}
    while stack:
        for node, _ in stack.pop().next_functions:
            if node is not None:
                consumers[node] = consumers.get(node, 0) + 1
                if node not in seen:
                    seen.add(node)
                    stack.append(node)
    pairs = []
    for norm, tensor, grad_fn in consumed:
        conv, output_tensor, conv_fn = produced.get(id(tensor), (None, None, None))
        if (conv is not None and output_tensor is tensor and conv_fn is not None and grad_fn is conv_fn
                and calls[conv] == 1 and calls[norm] == 1 and consumers.get(conv_fn) == 1):
            pairs.append((names[conv], names[norm]))
    return tuple(pairs)


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """The module's own parameters and buffers (not its children's)."""
    return [t for d in (module._parameters, module._buffers) for t in d.values() if t is not None]


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    """The pair can be folded right now: eval-mode running statistics, no hooks or patched forward."""
    return (type(conv) is nn.Conv2d and type(norm) is nn.BatchNorm2d and not norm.training
            and norm.track_running_stats and norm.running_mean is not None and norm.running_var is not None
            and conv.weight.dtype == norm.running_var.dtype
            and not any(getattr(m, d, None) for m in (conv, norm) for d in HOOK_DICTS)
            and "forward" not in conv.__dict__ and "forward" not in norm.__dict__)


def _global_hooks() -> bool:
    from torch.nn.modules import module as module_file

    return any(getattr(module_file, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))


@contextmanager
def inference_weights(
    model: nn.Module, channels_last: bool = False, fold_probe: torch.Tensor | None = None,
    keep: nn.Module | None = None,
) -> Iterator[int]:
    """Faster weights while inside, the model's own tensors and modules put back after; yields the folds.

    * ``fold_probe`` (an input, (B, 3, H, W)): every eval-mode ``BatchNorm2d`` that alone consumes
      a ``Conv2d``'s output (:func:`conv_bn_pairs`, probed once per model structure with
      ``fold_probe[:1]``) is folded into that convolution, as ``torch.nn.utils.fusion.
      fuse_conv_bn_weights`` computes it: weight ``w * g / sqrt(v + eps)``, bias
      ``(b - m) * g / sqrt(v + eps) + beta``; the convolution's weight ``.data`` (and bias) are
      swapped for the folded ones and the batch norm for an ``nn.Identity`` in its parent. Same
      function up to float rounding (~1e-7 relative per layer), one elementwise pass fewer forward
      and backward per batch norm. Pairs with hooks on either module, or with ``keep`` (a layer a
      method is about to hook), are left alone.
    * ``channels_last``: every other 4-D parameter and buffer's ``.data`` is swapped for a
      channels-last copy (folded weights are written channels-last directly).

    Everything is put back in ``finally`` (the original tensor objects: storage, strides, values);
    ``Parameter`` objects, ``.grad`` and ``requires_grad`` are untouched. Call it under the model's
    lock (inside :func:`guarded`, which also sets eval mode).
    """
    layout = torch.channels_last if channels_last else torch.contiguous_format
    state = _state(model)
    modules = state.modules(model)
    pairs: list[tuple[nn.Module, nn.Module, nn.Module, str]] = []
    if fold_probe is not None and not _global_hooks():
        if state.conv_bn is None:
            state.conv_bn = conv_bn_pairs(model, fold_probe)
        for conv_name, norm_name in state.conv_bn:
            parent_name, _, child = norm_name.rpartition(".")
            conv, parent = model.get_submodule(conv_name), model.get_submodule(parent_name)
            norm = parent._modules.get(child)
            if norm is not None and keep is not conv and keep is not norm and _foldable(conv, norm):
                pairs.append((conv, norm, parent, child))
    # a nested call (the lock is re-entrant) must not write into the buffers the outer call uses
    reuse = not state.scratch_busy
    scratch = state.scratch if reuse else {}
    state.scratch_busy = True

    used: dict[torch.Tensor, torch.Tensor] = {}

    def buffer_for(tensor: torch.Tensor) -> torch.Tensor:
        buffer = scratch.get(tensor)
        if (buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype
                or buffer.device != tensor.device or not buffer.is_contiguous(memory_format=layout)):
            buffer = torch.empty_like(tensor, memory_format=layout)
        used[tensor] = buffer
        return buffer

    swapped: list[tuple[torch.Tensor, torch.Tensor]] = []
    biases: list[tuple[nn.Module, torch.Tensor | None]] = []
    unplugged: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        with torch.no_grad():
            for conv, norm, _, _ in pairs:
                rsqrt = torch.rsqrt(norm.running_var + norm.eps)
                scale = rsqrt if norm.weight is None else norm.weight * rsqrt
                weight = buffer_for(conv.weight)
                torch.mul(conv.weight, scale.reshape(-1, 1, 1, 1), out=weight)
                bias = -norm.running_mean if conv.bias is None else conv.bias - norm.running_mean
                bias = bias * rsqrt
                if norm.weight is not None:
                    bias = bias * norm.weight
                if norm.bias is not None:
                    bias = bias + norm.bias
                swapped.append((conv.weight, conv.weight.data))
                conv.weight.data = weight
                biases.append((conv, conv._parameters["bias"]))
                if conv.bias is None:
                    conv._parameters["bias"] = bias
                else:
                    swapped.append((conv.bias, conv.bias.data))
                    conv.bias.data = bias
        if channels_last:
            for module in modules:
                for tensors in (module._parameters, module._buffers):
                    for tensor in tensors.values():
                        # (inference tensors, made under inference_mode, cannot take a .data swap)
                        if tensor is not None and tensor.dim() == 4 and not tensor.is_inference() and not (
                            tensor.is_contiguous(memory_format=torch.channels_last)
                        ):
                            original = tensor.data
                            copy = buffer_for(tensor)
                            copy.copy_(original)
                            swapped.append((tensor, original))
                            tensor.data = copy
        for _, norm, parent, child in pairs:  # last: the tree is unchanged while the cache is read
            unplugged.append((parent, child, norm))
            parent._modules[child] = nn.Identity()
        yield len(pairs)
    finally:
        for parent, child, norm in reversed(unplugged):
            parent._modules[child] = norm
        for conv, bias in reversed(biases):
            conv._parameters["bias"] = bias
        for tensor, original in reversed(swapped):
            tensor.data = original
        if reuse:  # keep only this call's buffers (a replaced parameter's buffer is dropped)
            state.scratch = used
            state.scratch_busy = False


@contextmanager
def guarded(model: nn.Module, freeze: bool = True, parameters: bool = True) -> Iterator[None]:
    """Hold ``model``'s lock, run in eval mode, and restore structure, hooks, modes and gradients after.

    Cost (per call, CPU): ~23 us for ResNet-18 with ``parameters=False``, ~63 us with; flat passes
    over cached lists. Hooks: every hook registration takes the next id of PyTorch's global
    ``RemovableHandle`` counter and hook dictionaries are keyed by that id, so a hook added inside
    has an id >= the counter's value at entry; only when the counter moved are the (few) non-empty
    hook dictionaries scanned for such keys. Hooks present at entry are copied (only non-empty
    dictionaries: usually none) and put back if removed. ``model.eval()`` and the mode restore
    are skipped when no module is training.

    Args:
        model: the (possibly shared) model.
        freeze: with ``parameters``, set ``requires_grad=False`` on every parameter while inside.
        parameters: snapshot and restore every parameter's ``requires_grad`` and ``.grad``. Pass
            False only for methods that differentiate with ``torch.autograd.grad`` with respect to
            the input or activations (torchcam, captum): that never computes, writes or zeroes a
            weight gradient, so there is nothing to freeze or restore (the safety tests check it).
            grad-cam calls ``loss.backward()`` and ``model.zero_grad()``: keep the default there.
    """
    state = _state(model)
    with state.lock:
        modules = state.modules(model)
        children = state.children
        # the root's own dictionaries are looked up per call, not cached: a user hook on the model
        # that refers to the model would otherwise keep it alive through the weak-keyed cache
        hook_dicts = _hook_dicts([model]) + state.hook_dicts
        saved_hooks = [(d, dict(d)) for d in hook_dicts if d]
        first_new_id = RemovableHandle.next_id
        training = any(map(_TRAINING, modules))
        modes = list(map(_TRAINING, modules)) if training else None
        if parameters:
            params = [p for d in map(_PARAMETERS, modules) for p in d.values() if p is not None]
            grads = list(map(_GRAD, params))
            flags = list(map(_REQUIRES_GRAD, params))
        try:
            if parameters and freeze:
                for p, requires_grad in zip(params, flags):
                    if requires_grad:
                        p.requires_grad_(False)
            if training:
                model.eval()
            yield
        finally:
            if not all(map(operator.eq, map(_MODULES, modules), children)):
                _restore_children(modules, children)
            if RemovableHandle.next_id != first_new_id:  # something registered a hook (maybe a tensor's)
                for d in hook_dicts:
                    if d:
                        for key in [k for k in d if k >= first_new_id]:
                            del d[key]
            for current, saved in saved_hooks:
                if current.keys() != saved.keys():
                    current.clear()
                    current.update(saved)
            if training:
                _restore_training(modules, modes)
            elif any(map(_TRAINING, modules)):
                _restore_training(modules, [False] * len(modules))
            if parameters:
                for p, requires_grad, grad in zip(params, flags, grads):
                    if p.requires_grad is not requires_grad:
                        p.requires_grad_(requires_grad)
                    if p.grad is not grad:
                        p.grad = grad


@contextmanager
def eval_locked(model: nn.Module) -> Iterator[None]:
    """Light guard for methods that add no hooks and need no gradient: the lock and eval mode only."""
    state = _state(model)
    with state.lock:
        modules = state.modules(model)
        training = any(map(_TRAINING, modules))
        modes = list(map(_TRAINING, modules)) if training else None
        try:
            if training:
                model.eval()
            yield
        finally:
            if training:
                _restore_training(modules, modes)
            elif any(map(_TRAINING, modules)):
                _restore_training(modules, [False] * len(modules))


@contextmanager
def autograd_from(layer: nn.Module) -> Iterator[None]:
    """Inside: the model runs without autograd up to ``layer``; its output starts a fresh graph.

    A forward hook (first in line, so torchcam's hooks store the new tensor) detaches the output,
    marks it as requiring grad and switches grad mode on for the rest of the forward pass; grad
    mode is put back on exit (it is thread-local, so other threads are not affected). For the
    methods that need gradients at ``layer`` only (Grad-CAM family): the backbone's forward pass
    records no graph and nothing is back-propagated through it, and the gradient at ``layer`` is
    the same as with a full graph.
    """
    previous = torch.is_grad_enabled()

    def start_graph(_module, _inputs, output):
        torch.set_grad_enabled(True)
        return output.detach().requires_grad_(True)

    handle = layer.register_forward_hook(start_graph, prepend=True)
    try:
        with torch.no_grad():
            yield
    finally:
        handle.remove()
        torch.set_grad_enabled(previous)

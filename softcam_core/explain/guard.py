"""Leave a shared model exactly as found after an explanation, even when a method raises.

Streamlit serves every session from one cached model, and the saliency libraries mutate the
model while they work: torchcam and grad-cam register forward hooks, captum's guided backprop
registers backward hooks on every ReLU, grad-cam calls ``model.eval()`` and ``model.zero_grad()``,
and grad-cam's AblationCAM swaps the target layer for an ``AblationLayer`` (and does not put it
back if it raises). :func:`guarded` snapshots what they touch and restores it in ``finally``:

* child-module structure of every module (undoes any layer swap),
* every module's hook dictionaries (removes any hook left behind),
* every module's ``training`` flag,
* every parameter's ``requires_grad`` flag and ``.grad`` tensor (the object itself).

While inside, parameters are frozen (``requires_grad=False``): methods differentiate with respect
to the input and intermediate activations only, so no weight gradient is computed (less work) and
``.grad`` is never written. The model runs in eval mode (dropout off, batch-norm running
statistics) whatever mode it was in.

Concurrency: hooks live on the shared model, so two explanations of the same model must not
overlap. Each model has one re-entrant lock (:func:`model_lock`); calls on the same model from
several threads run one after the other and give the same maps as serial calls. Calls on
different models run in parallel.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)

_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The per-model re-entrant lock that serialises explanations of ``model``."""
    with _LOCKS_LOCK:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@contextmanager
def guarded(model: nn.Module, freeze: bool = True) -> Iterator[None]:
    """Hold ``model``'s lock, run in eval mode, and restore structure, hooks, modes and gradients after.

    Args:
        model: the (possibly shared) model.
        freeze: set ``requires_grad=False`` on every parameter while inside (restored after).
    """
    with model_lock(model):
        modules = list(model.modules())
        children = [(m, dict(m._modules)) for m in modules]
        hooks = {
            (id(m), name): dict(getattr(m, name)) for m in modules for name in HOOK_DICTS if getattr(m, name, None)
        }
        modes = [(m, m.training) for m in modules]
        parameters = [p for m in modules for p in m._parameters.values() if p is not None]
        grads = [(p, p.requires_grad, p.grad) for p in parameters]
        try:
            if freeze:
                for p in parameters:
                    p.requires_grad_(False)
            model.eval()
            yield
        finally:
            for module, saved in children:
                if module._modules != saved:
                    module._modules.clear()
                    module._modules.update(saved)
            for module in modules:
                for name in HOOK_DICTS:
                    current = getattr(module, name, None)
                    saved = hooks.get((id(module), name))
                    if saved is None:
                        if current:
                            current.clear()
                    elif current.keys() != saved.keys():
                        current.clear()
                        current.update(saved)
            for module, training in modes:
                module.training = training
            for p, requires_grad, grad in grads:
                p.requires_grad_(requires_grad)
                if p.grad is not grad:
                    p.grad = grad


@contextmanager
def eval_locked(model: nn.Module) -> Iterator[None]:
    """Light guard for methods that add no hooks and need no gradient: the lock and eval mode only."""
    with model_lock(model):
        modes = [(m, m.training) for m in model.modules()]
        try:
            model.eval()
            yield
        finally:
            for module, training in modes:
                module.training = training

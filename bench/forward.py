"""Benchmark 1: SoftCAM prediction + evidence maps vs a plain torchvision forward.

SoftCAM's explanation comes out of the forward pass, so ``forward_with_maps`` should cost no more
than the torchvision classifier it was made from (target ratio <= 1.05). Both sides share the very
same backbone modules (``to_softcam`` reuses the torchvision model's layers), run under
``torch.inference_mode`` in eval mode, fp32, contiguous NCHW, on the same input.

For ResNet the evidence head is one 1x1 convolution (C x 2048 per position), which costs the same
order as the FC head it replaces; for VGG the paper's head is three 1x1 convolutions
(512 -> 4096 -> 4096 -> C) applied at *every* position of the 16x16 map of a 512x512 input,
whereas torchvision's VGG pools to 7x7 first. That head is ~4.8 GMAC per image against ~81 GMAC
for the VGG-16 backbone, so a ratio of ~1.06 is expected there: it is the architecture's cost,
not overhead of our code.

Two lines per case on CPU:

* ``forward ...`` (target <= 1.05): the SoftCAM model as the product runs it, laid out by
  :func:`softcam_core.models.inference_layout` (what ``softcam predict``, ``evaluate`` and the app
  load: channels-last weights on CPU), against torchvision's model as a user gets it (default
  layout). This is the cost a clinician sees.
* ``forward ... same layout`` (informational): both in the default layout, i.e. the architecture's
  own cost (~1.00 for ResNet-50, ~1.06 for the paper's VGG head by FLOP count).

On CUDA the layout is the same for both, so only the first line is printed.
"""

from __future__ import annotations

import copy

import torch
import torchvision

from bench.common import Config, Result, max_abs_diff, overhead, time_pair
from softcam_core.models import inference_layout, to_softcam

NAME = "forward"
TARGET = 1.05
NUM_CLASSES = 5


def cases(config: Config) -> tuple[list[str], int, list[int]]:
    """(architectures, input size, batch sizes) for the run level."""
    return config.pick(
        tiny=(["resnet18"], 64, [1]),
        quick=(["resnet50", "vgg16"], 224, [1, 2]),
        full=(["resnet50", "vgg16"], 512, [1, 8]),
    )


def repeats(config: Config, device: torch.device) -> int:
    if device.type == "cuda":
        return config.pick(tiny=2, quick=10, full=30)
    return config.pick(tiny=1, quick=3, full=7)


def run(config: Config) -> list[Result]:
    archs, size, batches = cases(config)
    results = []
    for device in config.devices:
        for arch in archs:
            torch.manual_seed(0)
            reference = torchvision.models.get_model(arch, weights=None, num_classes=NUM_CLASSES).eval()
            same_layout = to_softcam(reference, NUM_CLASSES).eval()  # shares the backbone modules
            reference.to(device)
            same_layout.to(device)
            product = inference_layout(copy.deepcopy(same_layout), device)
            variants = [("", product, TARGET)]
            if device.type == "cpu":
                variants.append((" same layout", same_layout, None))
            for batch in batches:
                x = torch.randn(batch, 3, size, size, device=device)
                for suffix, ours, target in variants:
                    with torch.inference_mode():
                        logits, maps = ours.forward_with_maps(x)
                        ref_logits = reference(x)
                        paired = time_pair(
                            lambda: ours.forward_with_maps(x),
                            lambda: reference(x),
                            device,
                            repeats=repeats(config, device),
                            warmup=config.pick(tiny=1, quick=1, full=2),
                        )
                    extra = {"maps": "x".join(map(str, maps.shape))}
                    if arch.startswith("resnet"):
                        # the evidence head holds the FC weights, so the logits must agree
                        extra["logits max abs diff"] = max_abs_diff(logits, ref_logits)
                    results.append(
                        overhead(f"forward {arch} {size}px batch {batch}{suffix}", device, paired, target, **extra)
                    )
                    print(results[-1].line(), flush=True)
            del product, same_layout, reference
    return results

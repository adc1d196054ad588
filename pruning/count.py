"""The framework's one counter: MACs of conv and linear layers, and parameters, of any model.

Convention (see README): MACs of every conv and linear layer, SE 1x1 convs included; batch norm,
activations, the SE multiply, residual adds and pooling are not counted. This equals
``torch.utils.flop_counter.FlopCounterMode`` total / 2 on CNNs.

Command line::

    python -m pruning.count efficientnet_b1_pruned --img-size 240
    python -m pruning.count efficientnet_b1 --spec pruned_spec.txt --json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class Count:
    """MACs and parameters of one model at one input size."""

    macs: int
    params: int


def _layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        return output[0].numel() * per_output
    return output[0].numel() * module.in_features  # nn.Linear


def count_macs_per_layer(model: nn.Module, img_size: int | Sequence[int], in_chans: int = 3) -> dict[str, int]:
    """MACs of every conv and linear layer for one image, measured by a forward pass (eval mode, no grad)."""
    hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    per_layer: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            def hook(mod, inputs, output, name=name):
                per_layer[name] = per_layer.get(name, 0) + _layer_macs(mod, output)
            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, in_chans, *hw, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return per_layer


def count_model(model: nn.Module, img_size: int | Sequence[int], in_chans: int = 3) -> Count:
    """MACs (conv + linear, one image) and parameters of ``model`` at ``img_size``."""
    macs = sum(count_macs_per_layer(model, img_size, in_chans).values())
    return Count(macs=macs, params=sum(p.numel() for p in model.parameters()))


def default_img_size(model: nn.Module) -> int:
    """The model's native resolution from its timm pretrained_cfg (224 if unknown)."""
    return int(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1])


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m pruning.count", description="Count MACs and params of a timm model.")
    ap.add_argument("model", help="timm model name, e.g. efficientnet_b1 or efficientnet_b1_pruned")
    ap.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's own)")
    ap.add_argument("--spec", default=None, help="timm pruned-architecture spec file to adapt the model with")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from .models import create_model
    from .timm_spec import adapt_to_spec, read_spec

    args = _parse_args(argv)
    try:
        spec = read_spec(args.spec) if args.spec else None
        model = create_model(args.model)
        if spec is not None:
            model = adapt_to_spec(model, spec)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    img_size = args.img_size or default_img_size(model)
    count = count_model(model, img_size)
    if args.json:
        print(json.dumps({"model": args.model, "img_size": img_size, "macs": count.macs, "params": count.params}))
    else:
        print(f"{args.model} @ {img_size}px: {count.macs:,} MACs, {count.params:,} params")
    return 0


if __name__ == "__main__":
    sys.exit(main())

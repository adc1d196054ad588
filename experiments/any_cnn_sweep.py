"""Sweep timm CNN families through channel-group discovery: each model is refused with a named operation, or
pruned exactly. Anything else (a crash, a pruned model that differs from the masked one, MACs the cost model
gets wrong) is a bug.

For each model (random weights, random norm statistics, biases and layer scales, at ``--img-size``): build the
channel graph, prune it at random (``--seeds``), and compare the pruned model with the unpruned one whose removed
channels are zeroed where they are consumed (the tests' reference), and the cost model's MACs with the MACs
counted on the pruned model. It drives the public API (``build_channel_graph``, ``prune_model``, ``macs_cost``,
``count_model``); the random pruning and the masked reference are the test suite's (``tests/_utils.py``).

    python experiments/any_cnn_sweep.py                 # the families below, ~20 s on 2 cores
    python experiments/any_cnn_sweep.py --models resnet18 mixnet_s --out /tmp/sweep.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import timm
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from _utils import masked_reference, random_keep, randomize_norms_and_biases  # noqa: E402

from pruning import UnsupportedLayerError, build_channel_graph, prune_model  # noqa: E402
from pruning._io import atomic_write_text  # noqa: E402
from pruning.cost import macs_cost  # noqa: E402
from pruning.count import count_model  # noqa: E402
from pruning.errors import UserInputError  # noqa: E402

FAMILIES = [  # one small member per timm CNN family
    "resnet18", "resnet50d", "seresnext26d_32x4d", "res2net50_14w_8s", "resnest14d", "skresnet18", "selecsls42b",
    "dla34", "dpn48b", "hrnet_w18_small", "vovnet39a", "ese_vovnet19b_dw", "xception41", "darknet17",
    "cspresnext50", "densenetblur121d", "mnasnet_small", "fbnetc_100", "hardcorenas_a", "tinynet_e",
    "semnasnet_075", "spnasnet_100", "mobilenetv2_050", "mobilenetv3_small_050", "efficientnet_es", "tf_mixnet_s",
    "mixnet_m", "rexnetr_100", "ghostnetv2_100", "convnext_femto", "repghostnet_050", "mobileone_s0", "gernet_s",
    "hgnetv2_b0", "nf_regnet_b0", "regnety_002", "regnetz_005", "resnetv2_50", "eca_resnet33ts",
    "lambda_resnet26t", "efficientvit_b0", "fastvit_t8", "edgenext_xx_small",
]


def check(name: str, img_size: int, seeds: list[int]) -> dict:
    """One model: ``refused`` (with the reason), ``exact``, or ``bad`` / ``crash`` (a bug)."""
    torch.manual_seed(0)
    model = randomize_norms_and_biases(timm.create_model(name, pretrained=False), img_size=img_size).eval()
    try:
        graph = build_channel_graph(model, img_size)
    except (UnsupportedLayerError, UserInputError) as e:
        return {"status": "refused", "reason": str(e)}
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    errors, macs_exact = [], True
    for seed in seeds:
        keep = random_keep(graph, seed=seed)
        pruned = prune_model(model, graph, keep).eval()
        with torch.no_grad():
            got, expected = pruned(x), masked_reference(model, graph, keep).eval()(x)
        errors.append((got - expected).abs().max().item() / max(1.0, expected.abs().max().item()))
        macs_exact &= macs_cost(graph)({g: len(k) for g, k in keep.items()}) == count_model(pruned, img_size).macs
    ok = max(errors) <= 1e-5 and macs_exact
    return {"status": "exact" if ok else "bad", "max_rel_error": max(errors), "macs_exact": macs_exact,
            "prunable_groups": len(graph.prunable_groups())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=FAMILIES)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "any_cnn_sweep.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    results = {}
    for name in args.models:
        start = time.perf_counter()
        try:
            results[name] = check(name, args.img_size, args.seeds)
        except Exception as e:  # noqa: BLE001 - the sweep reports every failure and goes on
            results[name] = {"status": "crash", "reason": f"{type(e).__name__}: {e}"}
        r = results[name]
        detail = r.get("reason", "")[:110] or f"error {r['max_rel_error']:.1e}, MACs exact {r['macs_exact']}, " \
                                               f"{r['prunable_groups']} groups"
        print(f"{name:24s} {r['status']:8s} {time.perf_counter() - start:5.1f}s  {detail}", flush=True)
    counts = {s: sum(r["status"] == s for r in results.values()) for s in ("exact", "refused", "bad", "crash")}
    print(counts)
    command = " ".join(["python experiments/any_cnn_sweep.py", *sys.argv[1:]])
    atomic_write_text(args.out, json.dumps({"command": command, "img_size": args.img_size, "seeds": args.seeds, "torch": torch.__version__,
                                            "timm": timm.__version__, "results": results}, indent=1) + "\n")
    sys.exit(1 if counts["bad"] or counts["crash"] else 0)


if __name__ == "__main__":
    main()

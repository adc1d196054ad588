"""Build (or reuse) a model's latency table on this machine: ``python -m pruning.profile MODEL --img-size N``.

The table is what ``budget.latency`` prunes against: every layer timed at a few widths on this device, in
this runtime, at this batch size (see :mod:`pruning.latency`). It is cached under ``--cache-dir`` keyed by
everything it depends on, so a second call (or a pipeline run with the same settings) reuses it::

    python -m pruning.profile efficientnet_b0 --img-size 224 --batch 1 --threads 2
    python -m pruning.profile efficientnet_b0 --img-size 224 --batch 32 --device cuda
    python -m pruning.profile tf_efficientnet_lite0 --img-size 224 --backend onnxruntime

Bad input (an unknown model, backend or device, a missing checkpoint, a corrupt cached table) exits with
code 2 and a one-line message.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

DEFAULT_CACHE_DIR = os.environ.get("KP_CACHE_DIR", "outputs/cache")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m pruning.profile",
                                 description="Measure (or reuse) a timm model's latency table on this machine.")
    ap.add_argument("model", help="timm model name, e.g. efficientnet_b0")
    ap.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's own)")
    ap.add_argument("--batch", type=int, default=1, help="images per forward pass (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's current setting)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    ap.add_argument("--backend", default="torch", help="torch (eager) or onnxruntime (default torch)")
    ap.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, or float16 (CUDA)")
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                    help="folder of cached tables (default: $KP_CACHE_DIR or outputs/cache); tables go in latency/")
    ap.add_argument("--checkpoint", default=None, help="a state_dict to load (timing does not depend on weights)")
    ap.add_argument("--protected", nargs="*", default=None,
                    help="module-name patterns never pruned (default: the family's stem, first stage and head)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    from .count import default_img_size
    from .graph import build_channel_graph
    from .latency import check_settings, load_or_profile
    from .models import create_model

    settings = {"batch": args.batch, "threads": args.threads, "device": args.device, "backend": args.backend,
                "dtype": args.dtype}
    start = time.perf_counter()
    try:
        check_settings(**settings)
        if args.img_size is not None and args.img_size < 8:
            raise ValueError(f"--img-size must be at least 8, got {args.img_size}")
        model = create_model(args.model, checkpoint=args.checkpoint)
        img_size = args.img_size or default_img_size(model)
        graph = build_channel_graph(model, img_size, args.protected)
        table = load_or_profile(model, graph, args.model, os.path.join(args.cache_dir, "latency"),
                                progress=not args.quiet, **settings)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"latency table: {table.path} ({'reused from the cache' if table.reused else 'new'})")
    print(table.summary())
    print(f"this command took {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

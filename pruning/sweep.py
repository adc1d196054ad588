"""Sweeps (``python -m pruning.run -m ...``): one flat directory per run, and the runs a sweep launched.

A sweep's run directory is ``<sweep dir>/<job number>_<its overrides>`` (``hydra.sweep.subdir`` in
``conf/config.yaml``). Override values are free text, so :func:`run_dirname` makes them one path component:
a path value is written as its last component and a short hash of the whole value
(``data.val_root=/data/imagenet-val-1300`` -> ``data.val_root=imagenet-val-1300~b2f2c8``), and a name that
would pass the file system's limit is cut and hashed. :func:`launched_jobs` reads back every run a sweep
launched (from its ``multirun.yaml``), so :mod:`pruning.summarize` can name the runs that have not finished;
:func:`differing` labels runs by the overrides that tell them apart.
"""
from __future__ import annotations

import os
import re
from typing import Iterable, Sequence

from omegaconf import OmegaConf

from ._io import short_hash

MULTIRUN = "multirun.yaml"  # what Hydra writes into a sweep's folder: the config and the sweep's overrides
OVERRIDES = os.path.join(".hydra", "overrides.yaml")  # what Hydra writes into each run's directory
NAME_BYTES = 200  # a directory name stays under every file system's 255-byte limit, with the job number before it
_SEPARATORS = re.compile(r"[/\\]")
_DIRECTORY_PART = re.compile(r"[^,\[\]{}'\"]*[/\\]")  # each list item's folders: /a/b/c -> c, [/a/x,/b/y] -> [x,y]


def override_key(line: str) -> str:
    """The config key an override sets: ``budget.target`` for ``budget.target=0.5``, ``+budget.limits.x=1``
    gives ``budget.limits.x``, ``~model.protected`` gives ``model.protected``."""
    return line.partition("=")[0].lstrip("+~")


def _flat_value(value: str) -> str:
    """``value`` without path separators: each path's last component and a hash of the whole value."""
    if not _SEPARATORS.search(value):
        return value
    return f"{_DIRECTORY_PART.sub('', value)}~{short_hash(value, 6)}"


def run_dirname(overrides: Iterable[str], exclude_keys: Iterable[str] = ()) -> str:
    """One path component naming a run by its overrides (sorted, ``,``-joined, as Hydra's
    ``override_dirname``), whatever their values: path values shortened (module doc), and a name longer than
    :data:`NAME_BYTES` cut and ended with a hash of the whole. The Hydra resolver ``${run_dirname:...}``.

    Args:
        overrides: the run's overrides as typed (``hydra.overrides.task``).
        exclude_keys: keys left out of the name (``hydra.job.config.override_dirname.exclude_keys``).
    """
    excluded = set(exclude_keys)
    items = []
    for line in overrides:
        if override_key(line) in excluded:
            continue
        head, sep, value = line.partition("=")
        items.append(head + sep + _flat_value(value))
    name = ",".join(sorted(items))
    if len(name.encode()) <= NAME_BYTES:
        return name
    tag = "~" + short_hash(name, 8)
    cut = name.encode()[:NAME_BYTES - len(tag)].decode(errors="ignore")
    return cut + tag


OmegaConf.register_new_resolver("run_dirname", run_dirname, replace=True)


def launched_jobs(sweep_dir: str) -> list[list[str]] | None:
    """Every job's overrides, in job-number order, of the sweep Hydra launched into ``sweep_dir``; None when
    ``sweep_dir`` holds no ``multirun.yaml`` or its sweeper is not Hydra's basic one (whose expansion this
    repeats: ``hydra.sweeper.params`` first, then the command line's overrides)."""
    path = os.path.join(sweep_dir, MULTIRUN)
    if not os.path.isfile(path):
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra = OmegaConf.to_container(OmegaConf.load(path).hydra, resolve=False)
    sweeper = hydra.get("sweeper") or {}
    if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    arguments = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    arguments += list((hydra.get("overrides") or {}).get("task") or [])
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)
    return [list(job) for batch in batches for job in batch]


def run_overrides(run_dir: str) -> list[str] | None:
    """The overrides Hydra recorded for the run in ``run_dir`` (None when it recorded none)."""
    path = os.path.join(run_dir, OVERRIDES)
    return [str(o) for o in OmegaConf.load(path)] if os.path.isfile(path) else None


def differing(runs: Sequence[Sequence[str]]) -> list[str]:
    """For each run (its overrides), the overrides whose keys take more than one value across ``runs`` (a key
    some runs lack counts), in the runs' order: the labels that tell the runs apart. One run: its overrides."""
    def line(run: Sequence[str], key: str) -> str | None:
        return next((x for x in run if override_key(x) == key), None)

    keys = {override_key(x) for run in runs for x in run}
    keep = {k for k in keys if len({line(run, k) for run in runs}) > 1} if len(runs) > 1 else keys
    return [",".join(x for x in run if override_key(x) in keep) for run in runs]

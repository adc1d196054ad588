"""Latency measured in separate processes: a script re-runs itself with ``--latency-only KEY JSON``.

One process can favour a model (allocator state, kernel caches, turbo state at its start), so a speed claim
rests on several processes, each timing every model in interleaved rounds; the spread over them is reported.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Callable


def measured_in_processes(script: str, key: str, runs: int, rounds: int, out_dir: str) -> list[dict[str, float]]:
    """``python SCRIPT --latency-only KEY JSON --rounds ROUNDS`` in ``runs`` processes, one after the other;
    each process's ``{model: ms}``."""
    results = []
    for i in range(runs):
        path = os.path.join(out_dir, f".latency-{key}-{i}.json")
        subprocess.run([sys.executable, os.path.abspath(script), "--latency-only", key, path, "--rounds", str(rounds)],
                       check=True)
        with open(path) as f:
            results.append(json.load(f))
        os.unlink(path)
    return results


def serve_latency_request(request: list[str] | None, rounds: int, measure: Callable[[str, int], dict]) -> bool:
    """In the child process (``request`` = ``[KEY, JSON]``): measure and write the JSON; True when it did."""
    if not request:
        return False
    key, path = request
    with open(path, "w") as f:
        json.dump(measure(key, rounds), f)
    return True

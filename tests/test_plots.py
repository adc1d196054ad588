"""Plots: written as files, without touching the user's matplotlib state."""
from __future__ import annotations


def test_importing_the_package_leaves_the_matplotlib_backend_alone(tmp_path):
    """Plots are drawn outside pyplot, so a user's backend (here svg) is not switched by importing the app."""
    import os
    import subprocess
    import sys

    code = ("import matplotlib, pruning.pipeline, pruning.plots as p; "
            f"p.plot_learning_curve([[1, 10.0], [2, 20.0]], 30.0, {str(tmp_path / 'c.png')!r}, 't'); "
            "print(matplotlib.get_backend())")
    env = {**os.environ, "MPLBACKEND": "svg"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "svg" and (tmp_path / "c.png").stat().st_size > 1000

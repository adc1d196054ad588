"""The paper's published configurations, as shipped in timm (``efficientnet_b{1,2,3}_pruned``).

Budget names follow timm's model index ("FLOPs" 489.7M / 878.1M / 1239.6M), but the budgets are the MACs
of the published models counted with this project's convention (see README), on their base models.
"""
from __future__ import annotations

from dataclasses import dataclass


from .graph import ChannelGraph
from .timm_spec import timm_shipped_spec, widths_from_spec


@dataclass(frozen=True)
class PaperConfig:
    """One published pruned EfficientNet: its base model, resolution, MACs, params and accuracy."""

    budget: str
    base_model: str
    img_size: int
    timm_pruned: str
    macs: int
    params: int
    top1: float
    top5: float
    parent_top1: float


PAPER_CONFIGS: dict[str, PaperConfig] = {
    c.budget: c
    for c in (
        PaperConfig("flops_490M", "efficientnet_b1", 240, "efficientnet_b1_pruned", 391_208_019, 6_331_916, 78.25, 93.82, 79.2),
        PaperConfig("flops_878M", "efficientnet_b2", 260, "efficientnet_b2_pruned", 715_749_145, 8_309_737, 79.90, 94.84, 80.3),
        PaperConfig("flops_1240M", "efficientnet_b3", 300, "efficientnet_b3_pruned", 1_020_257_090, 9_855_020, 80.86, 95.27, 81.7),
    )
}


def paper_config(budget: str) -> PaperConfig:
    """The paper configuration named ``budget`` (e.g. ``flops_490M``), with an error listing the names."""
    if budget not in PAPER_CONFIGS:
        raise ValueError(f"unknown paper budget {budget!r}; the paper's budgets are {list(PAPER_CONFIGS)}")
    return PAPER_CONFIGS[budget]


def paper_widths(budget: str, graph: ChannelGraph) -> dict[str, int]:
    """Per-group widths of timm's published model for ``budget``, on ``graph`` (its base model's graph)."""
    return widths_from_spec(graph, timm_shipped_spec(paper_config(budget).timm_pruned))

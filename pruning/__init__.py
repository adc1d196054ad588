"""Knapsack channel pruning of ImageNet CNNs (Aflalo et al., 2020).

The model side of the pipeline lives here:

* :mod:`pruning.graph`: channel groups discovered from the model's fx graph,
* :mod:`pruning.cost`: exact MACs/params as a function of kept widths,
* :mod:`pruning.prune`: physical pruning (a real smaller model),
* :mod:`pruning.timm_spec`: timm's pruned-architecture format (export and import),
* :mod:`pruning.count`: the one MACs/params counter (``python -m pruning.count``).
"""
from .cost import CostModel
from .count import Count, count_model
from .errors import UserInputError
from .graph import ChannelGraph, ChannelGroup, Member, build_channel_graph
from .layers import UnsupportedLayerError, register_rule
from .models import create_model
from .prune import prune_model, prune_to_widths

__all__ = [
    "ChannelGraph", "ChannelGroup", "CostModel", "Count", "Member", "UnsupportedLayerError", "UserInputError",
    "build_channel_graph", "count_model", "create_model", "prune_model", "prune_to_widths", "register_rule",
]

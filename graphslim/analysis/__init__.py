"""Analyses: computed once per graph version through ``PassContext.analysis`` and reused."""

from __future__ import annotations

from graphslim.analysis.cost import CostReport, LayerCost, cost_model

__all__ = ["CostReport", "LayerCost", "cost_model"]

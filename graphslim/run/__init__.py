"""The run layer: the main job (load, run a pipeline, measure, compile, write OUT_DIR) and its cache."""

from __future__ import annotations

from graphslim.run.optimize import OptimizeResult, cache_key, model_digest, optimize

__all__ = ["OptimizeResult", "cache_key", "model_digest", "optimize"]

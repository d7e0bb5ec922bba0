"""TVM kernels, schedules and the Relax rewrites that use them, installed as ``graphslim.kernels``.

``REWRITES`` maps a name to ``f(mod, target_spec) -> (mod, changed)``; the backend
(:mod:`graphslim.backend`) applies every rewrite to the Relax module before lowering. Rewrites
that map compressed layers (block-sparse weights, int8 QDQ, binary weights) to graphslim's own
kernels are registered here as they land (issue 7); until then the dict is empty and every layer
takes TVM's dense path, which is always correct.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["REWRITES"]

REWRITES: dict[str, Callable[[Any, dict[str, Any]], tuple[Any, bool]]] = {}

"""TVM kernels, schedules and the Relax rewrites that use them, installed as ``graphslim.kernels``.

* :mod:`graphslim.kernels.schedules`: default CPU schedules for the dense hot ops (dlight rules);
* :mod:`graphslim.kernels.pipeline`: the Relax pipeline for CPU targets that applies them;
* :mod:`graphslim.kernels.tuning`: MetaSchedule tuning with a reusable database;
* :mod:`graphslim.kernels.sparse`: the block-sparse (BSR) dense kernel and its rewrite.

``REWRITES`` maps a name to ``f(mod, target_spec) -> (mod, changed)``; the backend
(:mod:`graphslim.backend`) applies every rewrite to the Relax module (as imported from ONNX)
before lowering, and lists the ones that changed something in ``artifact.json``. A rewrite must
leave every pattern it does not fully handle as it was: the dense path is always correct.
Importing this package does not import TVM; each rewrite imports it when called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["REWRITES"]


def _bsr_dense(mod: Any, spec: dict[str, Any]) -> tuple[Any, bool]:
    from graphslim.kernels.sparse import rewrite_bsr_dense

    return rewrite_bsr_dense(mod, spec)


REWRITES: dict[str, Callable[[Any, dict[str, Any]], tuple[Any, bool]]] = {
    "bsr-dense": _bsr_dense,
}

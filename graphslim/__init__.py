"""graphslim: a compiler-style optimizer that makes ONNX models small and fast.

Stable Python API::

    import graphslim
    model = graphslim.load("model.onnx")
    result = graphslim.optimize("model.onnx", "out/", pipeline="fold-batchnorm,prune-channels{ratio=0.5}")
    graphslim.save(result.model, "small.onnx")
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

from graphslim.errors import GraphslimError, InputError, PassError, PipelineError, VerificationError  # noqa: E402
from graphslim.ir import Graph, load_model, save_model  # noqa: E402
from graphslim.optimize import OptimizeResult, optimize  # noqa: E402
from graphslim.passmanager import (  # noqa: E402
    Pass,
    PassContext,
    PassManager,
    PassResult,
    Skip,
    get_pass,
    register_pass,
    registered_passes,
)
from graphslim.pipeline import Pipeline  # noqa: E402

load = load_model
save = save_model

logging.getLogger(__name__).addHandler(logging.NullHandler())
logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)

__all__ = [
    "Graph",
    "GraphslimError",
    "InputError",
    "OptimizeResult",
    "Pass",
    "PassContext",
    "PassError",
    "PassManager",
    "PassResult",
    "Pipeline",
    "PipelineError",
    "Skip",
    "VerificationError",
    "__version__",
    "get_pass",
    "load",
    "load_model",
    "optimize",
    "register_pass",
    "registered_passes",
    "save",
    "save_model",
]

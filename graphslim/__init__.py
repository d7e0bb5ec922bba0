"""graphslim: a compiler-style optimizer that makes ONNX models small and fast.

Stable Python API::

    import graphslim
    model = graphslim.load("model.onnx")
    result = graphslim.optimize("model.onnx", "out/", pipeline="fold-batchnorm,prune-channels{ratio=0.5}")
    graphslim.save(result.model, "small.onnx")
"""

from __future__ import annotations

import logging

from graphslim import passes  # noqa: F401 - importing it registers the built-in passes
from graphslim.backend.options import CompileOptions
from graphslim.core.errors import GraphslimError, InputError, PassError, PipelineError, VerificationError
from graphslim.core.ir import Graph, load_model, save_model
from graphslim.core.version import __version__
from graphslim.pipeline import (
    Pass,
    PassContext,
    PassManager,
    PassResult,
    Pipeline,
    Skip,
    get_pass,
    register_pass,
    registered_passes,
)
from graphslim.run import OptimizeResult, optimize
from graphslim.run.options import Budgets, RunOptions, SearchOptions
from graphslim.run.search import SearchResult, search

load = load_model
save = save_model

logging.getLogger(__name__).addHandler(logging.NullHandler())
logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)

__all__ = [
    "Budgets",
    "CompileOptions",
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
    "RunOptions",
    "SearchOptions",
    "SearchResult",
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
    "search",
]

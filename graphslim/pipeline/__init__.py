"""The pass manager layer: pass registry, pipeline text, the pass context and the manager.

Modules here import the core and analysis layers and each other in this order only: ``options``
(pipeline text values) <- ``registry`` (Pass, register_pass) <- ``text`` (Pipeline) <- ``manager``
(PassContext, PassManager).
"""

from __future__ import annotations

from graphslim.pipeline.manager import PassContext, PassManager, PassRecord  # noqa: I001 - after text
from graphslim.pipeline.options import coerce_options, format_options, parse_layer_values, parse_pipeline_text
from graphslim.pipeline.registry import (
    ENTRY_POINT_GROUP,
    Pass,
    PassResult,
    Skip,
    get_pass,
    register_pass,
    registered_passes,
)
from graphslim.pipeline.text import Pipeline

__all__ = [
    "ENTRY_POINT_GROUP",
    "Pass",
    "PassContext",
    "PassManager",
    "PassRecord",
    "PassResult",
    "Pipeline",
    "Skip",
    "coerce_options",
    "format_options",
    "get_pass",
    "parse_layer_values",
    "parse_pipeline_text",
    "register_pass",
    "registered_passes",
]

"""graphslim's built-in passes, one module per pass; importing this package registers them."""

from __future__ import annotations

from graphslim.passes import (  # noqa: F401 - imported to register
    distill,
    eliminate_dead_nodes,
    eliminate_identity,
    factorize_svd,
    fold_batchnorm,
    fold_constants,
    fuse_matmul_add,
    prune_channels,
    prune_heads,
    prune_hidden,
    quantize_binary,
    quantize_int8,
    sparsify_blocks,
    spiral,
)

#: The pipeline ``graphslim optimize`` runs when none is given.
DEFAULT_PIPELINE = "fold-constants,eliminate-identity,fold-batchnorm,fuse-matmul-add,eliminate-dead-nodes"

__all__ = ["DEFAULT_PIPELINE"]

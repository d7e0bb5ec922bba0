"""Block structure of weight matrices: block norms and block sparsity.

Blocks tile a weight seen as an ``(outputs, inputs)`` matrix (see
:func:`graphslim.core.ops.weight_matrix`); ``[1, 4]`` is one output row by four inputs. Edge blocks
of a matrix whose size is not a multiple of the block are partial (padded with zeros).
"""

from __future__ import annotations

import numpy as np

__all__ = ["STANDARD_BLOCKS", "block_norms", "block_sparsity", "expand_block_mask"]

#: The block shapes the backend's block-sparse kernels use, reported by ``inspect``.
STANDARD_BLOCKS = ((1, 4), (4, 4), (16, 1))


def _padded(matrix: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    br, bc = block
    r, c = matrix.shape
    pr, pc = -r % br, -c % bc
    return np.pad(matrix, ((0, pr), (0, pc))) if pr or pc else matrix


def block_norms(matrix: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """L2 norm of every block: shape ``(ceil(rows / br), ceil(cols / bc))``."""
    br, bc = block
    m = _padded(matrix.astype(np.float64), block)
    r, c = m.shape
    return np.sqrt((m * m).reshape(r // br, br, c // bc, bc).sum(axis=(1, 3)))


def block_sparsity(matrix: np.ndarray, block: tuple[int, int]) -> float:
    """Fraction of blocks that are entirely zero."""
    br, bc = block
    m = _padded(matrix, block) != 0
    r, c = m.shape
    nonzero = m.reshape(r // br, br, c // bc, bc).any(axis=(1, 3))
    return float(1.0 - nonzero.mean()) if nonzero.size else 0.0


def expand_block_mask(mask: np.ndarray, block: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """A per-block boolean mask expanded to the matrix ``shape`` (cropping partial edge blocks)."""
    br, bc = block
    return np.repeat(np.repeat(mask, br, axis=0), bc, axis=1)[: shape[0], : shape[1]]

"""Small pattern predicates shared by passes (each returns a value or None, never mutates)."""

from __future__ import annotations

import numpy as np

from graphslim.core.ir import Graph, Node, Tensor

__all__ = ["channel_vector", "matrix_to_weight", "only_consumer", "weight_matrix", "weight_producer"]


def only_consumer(graph: Graph, t: Tensor) -> Node | None:
    """The single node reading ``t``, if exactly one does and ``t`` is not a graph output."""
    users = graph.consumers(t)
    if len(users) != 1 or graph.is_graph_output(t):
        return None
    return users[0]


def channel_vector(value: np.ndarray, rank: int, axis: int, channels: int) -> np.ndarray | None:
    """``value`` as a length-``channels`` vector if it broadcasts per channel along ``axis`` of a
    rank-``rank`` tensor (a scalar broadcasts to every channel); else None."""
    if value.size == 1:
        return np.full(channels, value.reshape(()), dtype=value.dtype)
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + tuple(value.shape)
    if shape[axis] != channels or any(d != 1 for i, d in enumerate(shape) if i != axis):
        return None
    return value.reshape(channels)


def weight_producer(graph: Graph, t: Tensor) -> Node | None:
    """The Conv/ConvTranspose/Gemm/MatMul with constant weights that produces ``t``, if any."""
    node = graph.producer(t)
    if node is None or node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        return None
    if graph.constant(node.inputs[1]) is None:
        return None
    return node


def weight_matrix(graph: Graph, node: Node) -> np.ndarray | None:
    """The constant weight of a Conv (groups=1 not required), Gemm or MatMul as an
    ``(outputs, inputs)`` matrix (a Conv's inputs are in*kh*kw); None if not constant or not 2-D-able.
    Batched MatMul weights (rank > 2) are not matrices: None."""
    w = graph.constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.dtype.kind != "f":
        return None
    if node.op == "Conv":
        return w.reshape(w.shape[0], -1)
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return None
        return w if node.attrs.get("transB", 0) else w.T
    if node.op == "MatMul" and w.ndim == 2:
        return w.T
    return None


def matrix_to_weight(node: Node, matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`weight_matrix`: the ``(outputs, inputs)`` matrix back in the node's layout."""
    if node.op == "Conv":
        return matrix.reshape(shape)
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return matrix
    return np.ascontiguousarray(matrix.T)

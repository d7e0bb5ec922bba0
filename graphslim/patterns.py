"""Small pattern predicates shared by passes (each returns a value or None, never mutates)."""

from __future__ import annotations

import numpy as np

from graphslim.ir import Graph, Node, Tensor

__all__ = ["channel_vector", "only_consumer", "weight_producer"]


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

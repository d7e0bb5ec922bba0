"""Small pattern predicates shared by passes (each returns a value or None, never mutates)."""

from __future__ import annotations

import numpy as np

from graphslim.core.ir import Graph, Node, Tensor
from graphslim.core.ops import op_info, weight_node

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


def weight_producer(graph: Graph, t: Tensor, role: str | None = None) -> Node | None:
    """The weight op of the op table (with a constant weight, and ``role`` if given) that
    produces ``t``, if any."""
    node = graph.producer(t)
    if node is None:
        return None
    info = op_info(node.op, node.domain)
    if info is None or info.weight is None or (role is not None and role not in info.roles):
        return None
    return node if weight_node(graph, node) is not None else None

"""The backend driver: compile with TVM, load and run artifacts, and time models (ONNX Runtime and
TVM). The kernels it plugs into TVM live in :mod:`graphslim.kernels`."""

from __future__ import annotations

from graphslim.backend.driver import TARGETS, Artifact, build, compile_model, host_cpu_flags, load_artifact, require_tvm

__all__ = ["TARGETS", "Artifact", "build", "compile_model", "host_cpu_flags", "load_artifact", "require_tvm"]

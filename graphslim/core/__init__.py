"""The core layer: errors, the IR facade (loading, saving, the graph), file-system safety, data
sets, ONNX Runtime sessions and the metrics every other layer uses. Imports nothing above it."""

"""Graph transformations that passes share, above the analyses: structured pruning (importance,
selection, physical removal) and distillation on onnxruntime-training."""

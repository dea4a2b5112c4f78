"""Rank service: a Transformer ranker trained on recall's candidates, served by ONNX Runtime.

Serving modules (config, features, runtime, servicer, server) never import torch;
training modules (model, train, export) do. Import submodules directly.
"""

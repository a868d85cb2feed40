"""Model tooling: the reference HybridCNNLSTM, its synthetic data, training and the optimizer.

Needs the ``train`` extra (torch, onnx). Nothing here runs in a production worker.
"""

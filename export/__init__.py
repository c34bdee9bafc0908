"""ONNX graphs of JanusFlow: one spec per graph (specs.py), export (onnx_export.py), verification."""

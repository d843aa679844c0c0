"""Stage 6, serving: a saved model classifying images (`Predictor`), over HTTP, and exported to
ONNX."""

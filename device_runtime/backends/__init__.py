"""What runs the network: backend and model-file selection, ONNX Runtime providers, TensorRT engines."""

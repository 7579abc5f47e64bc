"""What goes to the device: FP32 and INT8 (QDQ) ONNX graphs, TensorRT checks, parity, the bundle writer."""

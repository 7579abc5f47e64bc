"""Desktop export: FP32 (and later INT8 QDQ) ONNX, TensorRT compatibility checks, parity, the model bundle.

This package sits at the top of the dependency chain (device_runtime <- training <- qat <- export), so the
`nerveseg` command line, which runs every stage, lives here too.
"""

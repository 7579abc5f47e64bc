"""Desktop export, the top of the dependency chain (device_runtime <- training <- qat <- export), in three rooms:
`bundle` (FP32 and INT8 ONNX, TensorRT checks, parity, the model bundle), `report` (the accuracy-vs-bitwidth
report and ONNX Runtime's PTQ baseline) and `workflows` (pipeline, sweep, cross-validation); `cli`, the `nerveseg`
command line that runs every stage, sits on top. docs/LAYOUT.md has the map.
"""

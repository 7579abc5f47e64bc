"""The accuracy-vs-bitwidth report: rows read from run folders, ONNX Runtime's PTQ baseline, measurement,
statistics, figures, Markdown and HTML."""

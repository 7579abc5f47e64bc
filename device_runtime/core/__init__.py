"""The torch-free core that the device and the desktop share: errors, file I/O, the manifest, image reading,
preprocessing, post-processing, metrics and the ONNX Runtime session. The only part of device_runtime that training/,
qat/ and export/ may import (tests/test_layout.py checks it)."""

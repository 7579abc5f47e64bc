"""nerveseg's device side: runs a model bundle on an edge computer. Never imports torch.

Grouped along a frame's path: `sources` -> `pipeline` (preprocess, `backends`, postprocess) -> `outputs`, driven by
`runner`. What must behave identically on the desktop and on the device lives once in `core` (preprocess,
postprocess, metrics, manifest, ...), the only part `training`, `qat` and `export` import.
"""

__version__ = "0.1.0"  # the distribution's version (pyproject.toml reads it); --version of both tools

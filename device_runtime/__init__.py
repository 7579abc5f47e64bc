"""nerveseg's device side: runs a model bundle on an edge computer. Never imports torch.

The modules that must behave identically on the desktop and on the device live here once
(`preprocess`, `postprocess`, `metrics`, `manifest`), and `training` imports them.
"""

__version__ = "0.1.0"  # the distribution's version (pyproject.toml reads it); --version of both tools

"""nerveseg's device side: runs a model bundle on an edge computer. Never imports torch.

The modules that must behave identically on the desktop and on the device live here once
(`preprocess`, `postprocess`, `metrics`, `manifest`), and `training` imports them.
"""

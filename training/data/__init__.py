"""Frames and masks: datasets on disk, the synthetic phantom, augmentation, colour-mask rules."""

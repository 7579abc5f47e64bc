"""Workflows that chain the stages: pipeline, the QAT sweep, K-fold cross-validation (float and quantized)."""

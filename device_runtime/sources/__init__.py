"""Where frames come from: files, folders, videos, the synthetic generator (files), cameras and streams (live)."""

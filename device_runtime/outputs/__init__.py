"""Where results go: masks, overlays, video, JSON lines, a window, an MJPEG stream; and where they may be written."""

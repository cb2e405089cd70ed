"""Weir's protocol buffers: generated code and the private descriptor pool for ``inference``."""

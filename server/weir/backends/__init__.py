"""Model backends. Every backend implements ``weir.backends.base.Backend``."""

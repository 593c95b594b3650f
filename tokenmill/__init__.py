"""tokenmill: the composition root (command line, settings, local supervisor)."""

__version__ = "0.1.0"

"""aaau: a multi-user PTY bridge for AI coding agents running under their own user."""

__version__ = "0.1.0"

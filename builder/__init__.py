"""Kiln: immutable edge-AI OS images per hardware class."""

__version__ = "0.1.0"

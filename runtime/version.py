"""The project's version: the one place it is written (``setup.cfg`` and ``--version`` read it)."""

__version__ = "0.2.0"

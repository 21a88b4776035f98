"""The ``amad`` command line: config, data loading, model building, evaluation and plots.

It sits on the library (``amad.attention``, ``amad.capture``, ``amad.losses``,
``amad.distiller``, ``amad.trainer``) and never imports the benchmarks; the
``demo`` command reaches them through an entry point (:mod:`amad.cli.plugins`).
``main`` is the console script; it imports nothing heavy before a command runs.
"""

from .main import main

__all__ = ["main"]

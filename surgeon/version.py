"""surgeon's version: the one place it is written (pyproject.toml reads it from here).

A step's resume fingerprint includes it (:mod:`surgeon.engine.pipeline`): a
finished step computed by another version is recomputed, not reused.
"""
__version__ = "0.1.0"

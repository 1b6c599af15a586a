"""Rebuild the paper's figures and tables from saved results: ``python -m paper``."""

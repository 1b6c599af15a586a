"""Federated LoRA on the Transformer copying task.

``python -m simulations copying --config quick|paper``; see ``run.py`` for the pipeline
and ``RESULTS.md`` for the measured numbers. Importing this package does not import
torch; :func:`main` does.
"""

__all__ = ["main"]


def main(argv=None):
    """Run the experiment (``--config tiny|quick|paper``); returns the exit status."""
    from .run import main as run_main

    return run_main(argv)

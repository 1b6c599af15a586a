"""Integrations with federated-learning frameworks (optional dependencies, loaded lazily).

- :mod:`clairstat.integrations.flower`: a Flower strategy running any clairstat
  aggregation rule, CLAIR included, on the clients' LoRA adapters
  (``pip install clairstat[flower,lora]``).
"""

__all__ = ["flower"]


def __getattr__(name):
    # Lazy: ``import clairstat.integrations`` must not import flwr.
    if name == "flower":
        import importlib

        return importlib.import_module(".flower", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

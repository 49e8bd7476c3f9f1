"""octomil-sim: personalized and fair federated learning on Flower's simulation engine.

``octomil_sim.simulate(model=..., data=..., personalization=..., fairness=...)`` runs one simulation from
Python (``octomil_sim.api``); ``python -m octomil_sim`` / ``octomil-sim`` run it from the command line."""

__version__ = "0.1.0"

__all__ = ["PersonalizedModel", "Results", "simulate"]


def __getattr__(name: str):  # the API pulls in torch and Hydra: only when asked for
    if name in __all__:
        from octomil_sim import api

        return getattr(api, name)
    raise AttributeError(f"module 'octomil_sim' has no attribute {name!r}")

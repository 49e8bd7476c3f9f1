"""octomil-sim: personalized and fair federated learning on Flower's simulation engine."""

__version__ = "0.1.0"

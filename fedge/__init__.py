"""fedge: federated learning for fleets of small CPU devices, built on Flower."""

__version__ = "0.1.0"

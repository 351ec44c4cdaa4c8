"""Code both the coordinator and devices share: codec, wire helpers, models, data."""

"""The edge device: ClientApp, compression mod, edge runtime, CLI."""

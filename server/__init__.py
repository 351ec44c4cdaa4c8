"""The coordinator: ServerApp, strategy wrapper, gRPC service, store, CLI."""

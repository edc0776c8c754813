"""TorchServe-facing serving: the continuous-batching session, metrics, graceful shutdown."""

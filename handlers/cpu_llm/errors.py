"""Errors shared by several modules (kept apart to avoid import cycles)."""


class ConfigError(ValueError):
    """A setting's problem; the message always starts with where it is set and the offending key
    (model-config.yaml, or "environment" for an environment variable)."""

    def __init__(self, key: str, problem: str, source: str = "model-config.yaml") -> None:
        super().__init__(f"{source}: {key}: {problem}")
        self.key = key


class QuantizationError(RuntimeError):
    """Quantization was asked for but could not be applied."""

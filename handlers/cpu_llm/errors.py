"""Errors shared by several modules (kept apart to avoid import cycles)."""


class ConfigError(ValueError):
    """A model-config.yaml problem; the message always starts with the offending key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"model-config.yaml: {key}: {problem}")
        self.key = key


class QuantizationError(RuntimeError):
    """Quantization was asked for but could not be applied."""

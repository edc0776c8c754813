"""Errors shared by the config modules (kept apart to avoid an import cycle)."""


class ConfigError(ValueError):
    """A model-config.yaml problem; the message always starts with the offending key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"model-config.yaml: {key}: {problem}")
        self.key = key

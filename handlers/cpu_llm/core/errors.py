"""Errors shared by every layer: a setting's problem, a quantization that failed, a client's bad request."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A setting's problem; the message always starts with where it is set and the offending key
    (model-config.yaml, or "environment" for an environment variable)."""

    def __init__(self, key: str, problem: str, source: str = "model-config.yaml") -> None:
        super().__init__(f"{source}: {key}: {problem}")
        self.key = key


class QuantizationError(RuntimeError):
    """Quantization was asked for but could not be applied."""


class RequestError(ValueError):
    """A client error in one request; `field` names the offending JSON field."""

    def __init__(self, field_name: str, message: str, status: int = 400) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message
        self.status = status

    def to_json(self) -> dict[str, Any]:
        return {"error": {"field": self.field, "message": self.message, "code": self.status}}

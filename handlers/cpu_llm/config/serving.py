"""model-config.yaml: the one place where serving settings are read and validated.

TorchServe passes the whole YAML to the handler as `context.model_yaml_config`. Its
frontend keys are case-sensitive and a misspelt one (`BatchSize`) is silently ignored, so
we check every top-level key here, as well as our own `handler:` section, and fail the load
with an error that names the key. Validation happens once, at `initialize()` (and in
`scripts/build_archive.py`, so a bad config never gets packaged).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..core.errors import ConfigError
from .quantization import QuantizationConfig, parse_quantization_config
from .quantization import SECTION as QUANTIZATION_SECTION

# Keys TorchServe 0.12's frontend reads from model-config.yaml (ModelConfig.java).
FRONTEND_INT_KEYS = {
    "minWorkers": 1,
    "maxWorkers": 1,
    "batchSize": 1,
    "maxBatchDelay": 0,
    "responseTimeout": 1,
    "startupTimeout": 1,
    "jobQueueSize": 1,
    "parallelLevel": 1,
    "maxRetryTimeoutInSec": 0,
    "clientTimeoutInMills": 0,
}  # key -> smallest allowed value
FRONTEND_OTHER_KEYS = {
    "deviceType",
    "deviceIds",
    "parallelType",
    "continuousBatching",
    "asyncCommunication",
    "useJobTicket",
    "sequenceMaxIdleMSec",
    "sequenceTimeoutMSec",
    "maxNumSequence",
    "maxSequenceJobQueueSize",
    "useVenv",
    "torchrun",
    "pt2",
}
HANDLER_SECTION = "handler"
RUNNERS = ("auto", "llama", "hf")
SPECULATION = ("none", "ngram")  # how drafts are made (engine/ngram_drafter.py)
# The instruction sets our kernels are built for (kernels/csrc/dispatch.cpp), and their aliases;
# `kernel_isa` and the CPU_LLM_ISA environment variable take these names.
KERNEL_ISAS = ("avx2", "avx512-vnni")
KERNEL_ISA_ALIASES = {"avx512": "avx512-vnni"}


@dataclass(frozen=True)
class ServingConfig:
    """The validated `handler:` section. Field names are the YAML keys."""

    model_path: str = "model"  # folder in the archive, absolute local folder, or hub id
    num_threads: int = 0  # 0 = every core this worker may run on
    max_prompt_tokens: int = 1024  # longer prompts are rejected with HTTP 400
    max_new_tokens: int = 512  # server-side cap on a request's max_new_tokens
    default_max_new_tokens: int = 64  # used when a request does not say
    max_stop_sequences: int = 8
    # A request still generating after this many seconds ends with finish_reason "timeout" (with
    # continuous batching TorchServe's responseTimeout bounds one step, not a whole request).
    request_timeout_s: int = 600
    # Which forward pass serves the model: "llama" (our runner: Llama, Mistral, Qwen2 on the native
    # backend), "hf" (Hugging Face's modules), or "auto" (llama where it can, else hf; the load log says why).
    runner: str = "auto"
    # Our runner prefills at most this many prompt tokens per step, beside the running decodes.
    prefill_chunk_tokens: int = 256
    # Our runner keeps each finished request's keys and values, and a prompt that starts the same
    # way (system prompt, earlier chat turns) reuses them instead of prefilling them again.
    prefix_cache: bool = True
    # Speculative decoding on our runner: "ngram" drafts up to speculative_tokens tokens per step
    # by prompt lookup and verifies them in the same forward pass, while at most
    # speculative_max_batch requests decode; "none" turns it off.
    speculation: str = "none"
    speculative_tokens: int = 4
    speculative_max_batch: int = 1
    # Continuous batching: one handle() call keeps stepping for up to this many ms (until a request
    # finishes), so TorchServe's round trip per call is paid once per several tokens; 0 = one step.
    steps_per_call_ms: int = 50
    # Which instruction set our kernels run on: "auto" (the best this CPU has), or a lower one
    # (avx2, avx512-vnni; alias avx512) to serve or measure that path on a bigger CPU. The
    # CPU_LLM_ISA environment variable, when set, overrides it; the load log says which applied.
    kernel_isa: str = "auto"
    # The top-level `quantization:` section (see quantization.py).
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    # TorchServe's top-level `continuousBatching` key: requests join and leave a running batch.
    continuous_batching: bool = False
    # TorchServe's top-level `batchSize`: most requests in one batch (our runner's KV-cache slots).
    batch_size: int = 1


def _did_you_mean(key: str, known: set[str] | Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _positive_int(key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(key, f"must be an integer >= {minimum} (got {value!r})")
    return value


def validate_frontend(raw: Mapping[str, Any]) -> None:
    """Reject unknown or ill-typed top-level keys (TorchServe would silently ignore them)."""
    known = set(FRONTEND_INT_KEYS) | FRONTEND_OTHER_KEYS | {HANDLER_SECTION, QUANTIZATION_SECTION}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(
                key, f"unknown top-level key (keys are case-sensitive){_did_you_mean(key, known)}"
            )
        if key in FRONTEND_INT_KEYS:
            _positive_int(key, value, FRONTEND_INT_KEYS[key])
    if raw.get("minWorkers", 1) > raw.get("maxWorkers", raw.get("minWorkers", 1)):
        raise ConfigError("minWorkers", "must not exceed maxWorkers")


def parse_serving_config(raw: Mapping[str, Any] | None) -> ServingConfig:
    """Validate the whole model-config.yaml and return its `handler:` section."""
    raw = raw or {}
    if not isinstance(raw, Mapping):
        raise ConfigError("<root>", "must be a mapping")
    validate_frontend(raw)
    section = raw.get(HANDLER_SECTION) or {}
    if not isinstance(section, Mapping):
        raise ConfigError(HANDLER_SECTION, "must be a mapping")
    defaults = ServingConfig()
    known = set(defaults.__dataclass_fields__) - {"quantization", "continuous_batching", "batch_size"}
    for key in section:
        if key not in known:
            raise ConfigError(
                f"{HANDLER_SECTION}.{key}", f"unknown key{_did_you_mean(key, known)}"
            )
    values = {**defaults.__dict__, **section}

    model_path = values["model_path"]
    if not isinstance(model_path, str) or not model_path.strip():
        raise ConfigError(f"{HANDLER_SECTION}.model_path", "must be a non-empty string")
    num_threads = values["num_threads"]
    if num_threads == "auto":
        num_threads = 0
    _positive_int(f"{HANDLER_SECTION}.num_threads", num_threads, minimum=0)
    for key in ("max_prompt_tokens", "max_new_tokens", "default_max_new_tokens", "max_stop_sequences",
                "request_timeout_s", "prefill_chunk_tokens", "speculative_tokens", "speculative_max_batch"):
        _positive_int(f"{HANDLER_SECTION}.{key}", values[key])
    _positive_int(f"{HANDLER_SECTION}.steps_per_call_ms", values["steps_per_call_ms"], minimum=0)
    if values["default_max_new_tokens"] > values["max_new_tokens"]:
        raise ConfigError(
            f"{HANDLER_SECTION}.default_max_new_tokens",
            f"must not exceed handler.max_new_tokens ({values['max_new_tokens']})",
        )
    kernel_isa = values["kernel_isa"]
    if not isinstance(kernel_isa, str) or kernel_isa_name(kernel_isa) not in ("auto",) + KERNEL_ISAS:
        raise ConfigError(f"{HANDLER_SECTION}.kernel_isa", f"must be auto or one of {', '.join(KERNEL_ISAS)} "
                          f"(aliases: {', '.join(KERNEL_ISA_ALIASES)}), got {kernel_isa!r}")
    if not isinstance(values["prefix_cache"], bool):
        raise ConfigError(f"{HANDLER_SECTION}.prefix_cache", f"must be true or false (got {values['prefix_cache']!r})")
    if values["speculation"] not in SPECULATION:
        raise ConfigError(f"{HANDLER_SECTION}.speculation",
                          f"must be one of {', '.join(SPECULATION)} (got {values['speculation']!r})")
    if values["runner"] not in RUNNERS:
        raise ConfigError(f"{HANDLER_SECTION}.runner", f"must be one of {', '.join(RUNNERS)} (got {values['runner']!r})")
    quantization = parse_quantization_config(raw.get(QUANTIZATION_SECTION))
    continuous = raw.get("continuousBatching", False)
    if not isinstance(continuous, bool):
        raise ConfigError("continuousBatching", f"must be true or false (got {continuous!r})")
    for key in ("minWorkers", "maxWorkers") if continuous else ():
        if raw.get(key) != 1:
            # Measured: a model with two workers stalls its running requests whenever one worker
            # is idle, because that worker waits for a new request while holding the queue's lock.
            raise ConfigError(key, f"must be 1 with continuousBatching: true (got {raw.get(key, 'unset')!r}): "
                              "TorchServe 0.12's continuous batching stalls a model with several workers; "
                              "scale out with more servers instead (docs/reliability.md)")
    return ServingConfig(**{**values, "num_threads": num_threads, "quantization": quantization,
                            "kernel_isa": kernel_isa_name(kernel_isa),
                            "continuous_batching": continuous, "batch_size": raw.get("batchSize", 1)})


def kernel_isa_name(raw: str) -> str:
    """The canonical name of an instruction set as the config or CPU_LLM_ISA spells it."""
    name = raw.strip().lower()
    return KERNEL_ISA_ALIASES.get(name, name)


def check_context_length(config: ServingConfig, model_max_positions: int | None) -> None:
    """A prompt at the limit plus the longest allowed completion must fit the model."""
    if model_max_positions is None:
        return
    needed = config.max_prompt_tokens + config.max_new_tokens
    if needed > model_max_positions:
        raise ConfigError(
            f"{HANDLER_SECTION}.max_prompt_tokens",
            f"max_prompt_tokens + max_new_tokens = {needed} exceeds the model's "
            f"context of {model_max_positions} tokens",
        )


def resolve_threads(config: ServingConfig) -> int:
    """Threads for intra-op parallelism: the configured number, else the cores we may use."""
    return config.num_threads or len(os.sched_getaffinity(0))

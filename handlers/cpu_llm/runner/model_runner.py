"""The model runner: our Llama forward pass (models/llama.py), its slot KV cache and rotary
table, sized once at load; `run` takes one step's flattened tokens as plain lists.

`attach_runner` decides, at load, whether a served model runs here or on the Hugging Face path
(`handler.runner: auto|llama|hf`) and says why in the load log.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import psutil
import torch

from ..core.errors import ConfigError
from ..kernels import kernels_available
from ..layers.attention import RotaryTable, SlotKVCache
from ..models.llama import LlamaModel, unsupported_reason

if TYPE_CHECKING:
    from ..load.pipeline import ServedModel

logger = logging.getLogger(__name__)
# The KV cache may take at most this share of the memory available at load.
MAX_CACHE_SHARE = 0.5


class ModelRunner:
    """Runs flattened batches through the model; each request owns one cache slot."""

    def __init__(self, model: LlamaModel, slots: int, length: int, prefill_chunk: int) -> None:
        s = model.shape
        self.model, self.length, self.prefill_chunk = model, length, prefill_chunk
        self.cache = SlotKVCache(s.layers, slots, s.kv_heads, length, s.head_dim)
        self.rotary = RotaryTable(model.inv_freq, model.rope_scaling, length)

    @torch.inference_mode()
    def run(self, tokens: list[int], positions: list[int], slots: list[int], last: list[int]) -> torch.Tensor:
        """Token i sits at `positions[i]` of slot `slots[i]`; returns the logits (len(last), vocab) of
        the tokens indexed by `last`."""
        as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
        logits = self.model(as_long(tokens), as_long(positions), as_long(slots), as_long(last), self.rotary,
                            self.cache)
        self.cache.record(tokens, positions, slots)
        return logits


def attach_runner(served: "ServedModel", wanted: str, slots: int, length: int, prefill_chunk: int) -> None:
    """Serve `served` on our runner when `wanted` allows and the model suits it (then `served.model`
    becomes our LlamaModel and `served.runner` is set), else leave it on the Hugging Face path.
    `slots` requests of up to `length` tokens get KV cache; prompts are prefilled `prefill_chunk`
    tokens per step."""
    key = "handler.runner"
    model, backend = served.model, served.backend
    if wanted == "hf":
        reason = "set in the config"
    elif backend != "native":
        reason = f"the {backend} backend keeps its own model"
    elif not kernels_available():
        reason = "the compiled kernels are not available"
    else:
        reason = unsupported_reason(model, length)
    if reason is not None:
        if wanted == "llama":
            raise ConfigError(key, f"llama: cannot run this model: {reason}; use runner: auto or hf")
        logger.info("model runner: hugging face (%s)", reason)
        served.report["runner"] = "hf"
        return
    config = model.config
    layers, head_dim = len(model.model.layers), model.model.layers[0].self_attn.head_dim
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    need = SlotKVCache.bytes_needed(layers, slots, kv_heads, length, head_dim)
    available = psutil.virtual_memory().available
    if need > MAX_CACHE_SHARE * available:
        raise ConfigError("batchSize", f"the KV cache for batchSize {slots} x {length} tokens "
                          f"(handler.max_prompt_tokens + handler.max_new_tokens) needs {need / 2**20:.0f} MiB, more "
                          f"than half of the {available / 2**20:.0f} MiB available; lower one of them")
    served.model = LlamaModel(model)
    served.runner = ModelRunner(served.model, slots, length, prefill_chunk)
    served.report["runner"] = "llama"
    rows = served.model.stack_rows
    served.report["decoder_stack"] = "python" if served.model.stack is None else "c++"
    served.report["weights_arena"] = served.model.arena.as_report()
    driven = ("from Python (a projection the C++ stack does not call)" if served.model.stack is None
              else "from C++" + ("" if rows >= length else f" up to {rows} tokens per step"))
    logger.info("model runner: llama (%d layers; q/k/v and gate/up fused where quantized; layers run %s); KV cache "
                "%d slots x %d tokens = %.0f MiB (committed as used)", layers, driven, slots, length, need / 2**20)

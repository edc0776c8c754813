"""Loading a causal LM and its tokenizer, and turning a request into prompt token ids.

Works unchanged on both supported stacks (transformers 4.51.3 and 5.x); the only API
difference we meet is the name of the dtype argument of `from_pretrained`.
"""

from __future__ import annotations

import os
import re

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from ..config.serving import HANDLER_SECTION
from ..core.errors import ConfigError
from ..core.params import TokenizerInfo

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The one API difference of the two stacks: the name of the dtype argument when building a model.
FP32 = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32}


def resolve_model_source(model_path: str, model_dir: str) -> str:
    """Find the weights: a folder inside the archive, an absolute folder, or a hub id."""
    key = f"{HANDLER_SECTION}.model_path"
    if os.path.isabs(model_path):
        if not os.path.isdir(model_path):
            raise ConfigError(key, f"folder {model_path} does not exist")
        return model_path
    inside = os.path.join(model_dir, model_path)
    if os.path.isdir(inside):
        return inside
    if HUB_ID.match(model_path):
        return model_path  # downloaded by transformers; needs a host with internet access
    raise ConfigError(
        key, f"'{model_path}' is neither a folder in the model archive nor a hub id (org/name)"
    )


def load_model(source: str) -> tuple[torch.nn.Module, TokenizerInfo]:
    """Load model (fp32, eval mode) and tokenizer; resolve EOS and padding ids once."""
    model = AutoModelForCausalLM.from_pretrained(source, **FP32)
    model.eval()
    return model, load_tokenizer_info(source, model.generation_config)


def load_tokenizer_info(source: str, generation_config: GenerationConfig | None = None) -> TokenizerInfo:
    """The tokenizer with its EOS ids (the generation config's and the tokenizer's own) and padding id."""
    tokenizer = AutoTokenizer.from_pretrained(source)
    if generation_config is None:
        try:
            generation_config = GenerationConfig.from_pretrained(source)
        except OSError:  # no generation_config.json: the model config's ids
            generation_config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(source))
    eos = generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    if not eos_ids:
        raise ConfigError(f"{HANDLER_SECTION}.model_path", f"model at {source} defines no EOS token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    return TokenizerInfo(tokenizer=tokenizer, eos_ids=frozenset(eos_ids), pad_id=pad_id)


def max_positions(served) -> int | None:
    """Longest sequence the served model handles: its context, capped by IPEX's KV cache."""
    limit = getattr(served.model.config, "max_position_embeddings", None)
    if served.backend == "ipex":
        from .ipex_backend import IPEX_MAX_POSITIONS

        limit = min(limit or IPEX_MAX_POSITIONS, IPEX_MAX_POSITIONS)
    return limit

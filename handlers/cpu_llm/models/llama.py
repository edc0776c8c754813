"""Our forward pass for the Llama family (Llama 2/3, Mistral, Qwen2, SmolLM), built from a loaded
Hugging Face model whose linear layers may already be quantized.

Why not the Hugging Face modules: each decode step through them pays ~2,000 small ops of masks,
cache bookkeeping and transposes (~10-20 ms on a 30-layer model). Here a layer is seven ops: two
residual adds fused with their RMSNorms, the fused q/k/v projection, one attention op (rotary,
cache write and attention over the request's own slot: kernels.slot_attention), o_proj, the fused
gate/up projection with SiLU x up, and down_proj. Tokens of all requests are flattened into one (N, hidden)
batch, with no padding; logits are computed for the positions that need a next token only.

With the compiled kernels, every layer runs in one call (`kernels.decoder_stack`, a C++ loop over
the same ops on the same tensors, so bitwise the same result) for inputs of up to `stack_rows`
tokens: the ~240 op calls of a SmolLM2 decode step no longer each pay Python's and the
dispatcher's microseconds. Longer inputs (prefill chunks), and layers of a kind it does not know,
take the Python loop.

The weights are moved out of the Hugging Face model (fusing q/k/v and gate/up by concatenating
rows, see layers/fuse.py), so no weight is ever held twice, then into one arena on 2 MiB pages
in the order a step reads them (weight_arena.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from .. import kernels
from ..core.memory import release_freed_memory
from ..layers.attention import RotaryTable, SlotKVCache, attention
from ..layers.fuse import fuse_linears
from ..layers.quantized_linear import stack_linear_f32
from .weight_arena import pack_weights

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# Rotary variants whose angles depend on the sequence length: a fixed table cannot serve them.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


@dataclass(frozen=True)
class Shape:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    scale: float  # attention scores are q . k x scale


def unsupported_reason(model: torch.nn.Module, context: int) -> str | None:
    """Why `model` cannot run on this forward pass (None when it can), for a context of `context` tokens."""
    config = model.config
    name = type(model).__name__
    if name not in ARCHITECTURES:
        return f"architecture {name} is not one of {', '.join(ARCHITECTURES)}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act} (the runner implements silu)"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < context:
        return f"sliding-window attention ({window} tokens) shorter than the context ({context})"
    rope = getattr(model.model.rotary_emb, "rope_type", "default")
    if rope in _LENGTH_DEPENDENT_ROPE:
        return f"rope_type {rope} (its angles change with the sequence length)"
    if model.model.norm.weight.dtype != torch.float32:
        return f"weights in {model.model.norm.weight.dtype} (the runner computes in float32)"
    head_dim = model.model.layers[0].self_attn.head_dim
    if head_dim % 8:
        return f"head_dim {head_dim} is not a multiple of 8"
    return None


class DecoderLayer(torch.nn.Module):
    def __init__(self, hf_layer: torch.nn.Module) -> None:
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.input_norm = hf_layer.input_layernorm.weight
        self.post_attention_norm = hf_layer.post_attention_layernorm.weight
        self.qkv_proj = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = attn.o_proj
        self.gate_up_proj = fuse_linears([mlp.gate_proj, mlp.up_proj])
        self.down_proj = mlp.down_proj

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None, index: int, shape: Shape, rotary: RotaryTable,
                positions: torch.Tensor, slots: torch.Tensor, cache: SlotKVCache) -> torch.Tensor:
        """x (N, hidden) is the residual stream, `delta` what the previous layer adds to it (added
        here, in place, fused with the norm); returns what this layer adds."""
        h = (kernels.rms_norm(x, self.input_norm, shape.eps) if delta is None
             else kernels.add_rms_norm_(x, delta, self.input_norm, shape.eps))  # (N, hidden)
        qkv = self.qkv_proj(h)  # (N, (heads + 2 kv_heads) * head_dim)
        a = attention(qkv, rotary, positions, slots, cache, index, shape.heads, shape.kv_heads, shape.scale)
        h = kernels.add_rms_norm_(x, self.o_proj(a), self.post_attention_norm, shape.eps)
        return self.down_proj(kernels.silu_mul(self.gate_up_proj(h)))  # gate_up: (N, 2 intermediate)


def stack_linear(module: torch.nn.Module) -> kernels.StackLinear | None:
    """How the decoder stack calls `module` (None: it cannot)."""
    if hasattr(module, "stack_linear"):
        return module.stack_linear()
    if type(module) is torch.nn.Linear:  # F.linear: the BLAS
        return stack_linear_f32([module.weight], module.bias, use_kernel=False)
    return None


def build_stack(layers: list[DecoderLayer], shape: Shape) -> tuple[torch.ScriptObject | None, int]:
    """(the decoder stack running `layers`, the most tokens it serves), or (None, 0) when the
    kernels are missing or a projection is of a kind the stack does not call."""
    if not kernels.kernels_available():
        return None, 0
    specs = []
    for layer in layers:
        linears = [stack_linear(m) for m in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)]
        if any(lin is None for lin in linears):
            return None, 0
        specs.append((layer.input_norm, layer.post_attention_norm, linears))
    rows = min(lin.max_rows for _, _, linears in specs for lin in linears)
    return kernels.decoder_stack(shape.heads, shape.kv_heads, shape.scale, shape.eps, specs), rows


class LlamaModel(torch.nn.Module):
    """Embedding, decoder layers, final norm and LM head over flattened tokens."""

    def __init__(self, hf_model: torch.nn.Module) -> None:
        super().__init__()
        base, config = hf_model.model, hf_model.config
        first = base.layers[0].self_attn
        self.config = config
        self.shape = Shape(layers=len(base.layers), heads=config.num_attention_heads,
                           kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                           head_dim=first.head_dim, eps=base.norm.variance_epsilon, scale=first.scaling)
        self.embed_tokens = base.embed_tokens
        self.layers = torch.nn.ModuleList()
        for index in range(len(base.layers)):  # each Hugging Face layer let go once converted
            self.layers.append(DecoderLayer(base.layers[index]))
            base.layers[index] = torch.nn.Identity()
            release_freed_memory()  # its unfused parts back to the OS: the peak stays one layer above
        self.norm = base.norm.weight
        self.lm_head = hf_model.lm_head
        self.inv_freq = base.rotary_emb.inv_freq.detach().float()
        self.rope_scaling = float(getattr(base.rotary_emb, "attention_scaling", 1.0))
        self.arena = pack_weights(self)  # before the stack takes its tensors: they move in place anyway
        self.stack, self.stack_rows = build_stack(list(self.layers), self.shape)

    @contextmanager
    def python_loop(self) -> Iterator[None]:
        """Run the layers from Python inside (benchmarks and tests compare it with the stack;
        module hooks only fire here)."""
        stack, self.stack = self.stack, None
        try:
            yield
        finally:
            self.stack = stack

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, last: torch.Tensor,
                rotary: RotaryTable, cache: SlotKVCache) -> torch.Tensor:
        """tokens, positions, slots (N,); last (B,) the rows of N that need logits -> (B, vocab) float32."""
        x = self.embed_tokens(tokens).float().contiguous()  # (N, hidden), the residual stream
        if self.stack is not None and tokens.shape[0] <= self.stack_rows:
            delta = self.stack.forward(x, positions, slots, rotary.cos, rotary.sin, cache.keys, cache.values)
        else:
            delta = None
            for index, layer in enumerate(self.layers):
                delta = layer(x, delta, index, self.shape, rotary, positions, slots, cache)
        x = kernels.add_rms_norm_(x[last], delta[last], self.norm, self.shape.eps)  # (B, hidden)
        return self.lm_head(x).float()  # (B, vocab)

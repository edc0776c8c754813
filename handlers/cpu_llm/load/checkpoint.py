"""Build a model straight from its safetensors checkpoint with quantized layers, never holding
the full-precision model.

The model is constructed with its parameters on the `meta` device (no memory, no random init;
buffers such as rotary frequencies stay real). Then each linear weight is read from the
memory-mapped checkpoint a slice of rows at a time, quantized, and swapped in; every other
parameter is read as it is. Peak memory is the quantized model plus one slice, and fp16/bf16
checkpoints are converted slice by slice, never as a whole.

Checkpoints this cannot stream (no safetensors, key names the model does not use) return None,
and the caller loads the usual way and quantizes afterwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Callable, Iterator

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from ..core.memory import release_freed_memory
from ..core.progress import Progress
from ..formats.quantlib import PackedWeight, QuantSpec, kernel_weights, quantize
from ..layers.quantized_linear import FullPrecisionLinear, QuantizedEmbedding, as_linear, set_module
from .hf import FP32

logger = logging.getLogger(__name__)
ROWS_PER_SLICE = 1024  # rows quantized at a time: a few MB of fp32 in flight
# (name, quantize(spec) -> the weight packed, bias) -> the layer that serves it
LinearConverter = Callable[[str, Callable[[QuantSpec], PackedWeight], torch.Tensor | None], torch.nn.Module]
# (checkpoint key, rows read, first row) -> the value to load instead
Transform = Callable[[str, torch.Tensor, int], torch.Tensor]


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside put their parameters on the meta device (buffers stay real)."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


class Checkpoint:
    """The tensors of a (possibly sharded) safetensors checkpoint, read by name and row range.

    Read with plain file reads rather than safetensors' memory map: pages of a mapped file
    count in the process's RSS until it is unmapped, so mapping a 4 GB fp32 checkpoint to
    quantize it would show as 4 GB more peak memory. Format: an 8-byte little-endian header
    size, a JSON header {name: {dtype, shape, data_offsets}}, then the raw data.
    """

    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        files = (sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
                 if index.is_file() else [folder / "model.safetensors"] if (folder / "model.safetensors").is_file()
                 else [])
        self.folder = folder
        self._entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int]] = {}
        for path in files:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            for name, entry in header.items():
                if name != "__metadata__":
                    self._entries[name] = (path, self.DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                           8 + size + entry["data_offsets"][0])

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str, transposed: bool = False) -> tuple[int, ...]:
        shape = self._entries[name][2]
        return shape[::-1] if transposed else shape

    def rows(self, name: str, start: int, stop: int, transposed: bool = False) -> torch.Tensor:
        """Rows [start, stop) as float32; of the transpose for GPT-2's Conv1D layout (which is read
        whole: those models are small)."""
        if transposed:
            return self.tensor(name).T[start:stop].contiguous()
        path, dtype, shape, offset = self._entries[name]
        row = math.prod(shape[1:]) * dtype.itemsize
        data = bytearray((stop - start) * row)
        with open(path, "rb") as f:
            f.seek(offset + start * row)
            f.readinto(data)
        return torch.frombuffer(data, dtype=dtype).reshape(stop - start, *shape[1:]).float()

    def tensor(self, name: str) -> torch.Tensor:
        return self.rows(name, 0, self._entries[name][2][0]) if self._entries[name][2] else torch.tensor(0.0)


def quantize_in_slices(read_rows: Callable[[int, int], torch.Tensor], n: int, spec: QuantSpec) -> PackedWeight:
    """Quantize an [n, K] weight ROWS_PER_SLICE rows at a time into preallocated storage (every
    granularity we serve is per row or per group of a row, so slices quantize independently)."""
    first = kernel_weights(quantize(read_rows(0, min(n, ROWS_PER_SLICE)), spec))

    def full(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.new_empty((n, *t.shape[1:]))

    out = PackedWeight(full(first.qweight), full(first.scales), full(first.offsets), first.bits, first.zero)
    for start in range(0, n, ROWS_PER_SLICE):
        stop = min(n, start + ROWS_PER_SLICE)
        part = first if start == 0 else kernel_weights(quantize(read_rows(start, stop), spec))
        out.qweight[start:stop], out.scales[start:stop] = part.qweight, part.scales
        if out.offsets is not None:
            out.offsets[start:stop] = part.offsets
    return out


def missing_tensors(model: torch.nn.Module, checkpoint: Checkpoint) -> list[str]:
    """The parameters of `model` that `checkpoint` lacks (a head tied to the embedding needs none)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embedding.weight
    head_weight = {f"{name}.weight" for name, module in model.named_modules() if tied and module is head}
    return sorted(name for name, _ in model.named_parameters(remove_duplicate=False)
                  if name not in checkpoint and name not in head_weight)


def load_quantized(source: str, converter_for: Callable[[str | None], LinearConverter], head_spec: QuantSpec,
                   head_layer: Callable[[PackedWeight, torch.Tensor | None], torch.nn.Module],
                   kept: tuple[str, ...],
                   transform_for: Callable[[torch.nn.Module, Checkpoint], Transform | None] | None = None
                   ) -> torch.nn.Module | None:
    """The model at `source` with every linear layer from `converter_for(name of the LM head)`
    (those named in `kept` stay fp32), the input embedding quantized with `head_spec` (one
    scale per row), and a tied LM head served by `head_layer` over the embedding's own int8
    rows. `transform_for(model on meta, checkpoint)` may give every tensor read a new value
    (SmoothQuant's smoothing). None if the checkpoint cannot be streamed or the transform
    cannot be made."""
    load = QuantizedLoad.open(source, converter_for, head_spec, head_layer, kept, transform_for)
    if load is None:
        return None
    load.read()
    return load.model


class QuantizedLoad:
    """A model built on meta from its checkpoint, with the embedding and LM head read (quantized);
    every other part is read on demand (`read`): all of it for serving, or one decoder layer at
    a time (SmoothQuant scoring an alpha without holding the whole candidate)."""

    def __init__(self, model: torch.nn.Module, checkpoint: Checkpoint, convert: LinearConverter,
                 transform: Transform, kept: tuple[str, ...], done: set[str]) -> None:
        self.model, self.checkpoint, self.convert, self.transform, self.kept = model, checkpoint, convert, transform, kept
        self.done = done  # the embedding's and the tied head's keys, read already
        self.names = {name for name, _ in model.named_parameters(remove_duplicate=False)}

    @classmethod
    def open(cls, source: str, converter_for: Callable[[str | None], LinearConverter], head_spec: QuantSpec,
             head_layer: Callable[[PackedWeight, torch.Tensor | None], torch.nn.Module], kept: tuple[str, ...],
             transform_for: Callable[[torch.nn.Module, Checkpoint], Transform | None] | None = None
             ) -> "QuantizedLoad | None":
        """As load_quantized, with nothing but the embedding and a tied head read yet."""
        folder = Path(source)
        if not folder.is_dir():
            return None
        checkpoint = Checkpoint(folder)
        config = AutoConfig.from_pretrained(source)
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, **FP32)
        if (folder / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(source)
        names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        embedding = model.get_input_embeddings()
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is embedding.weight
        modules = dict(model.named_modules())
        head_name = next((n for n, m in modules.items() if m is head), None)
        embed_name = next(n for n, m in modules.items() if m is embedding)
        missing = missing_tensors(model, checkpoint)
        if missing:
            logger.info("streaming load not possible (%d tensors not in the checkpoint, e.g. %s): loading fp32 first",
                        len(missing), missing[0])
            return None
        transform = (lambda key, rows, start: rows) if transform_for is None else transform_for(model, checkpoint)
        if transform is None:
            return None

        with torch.no_grad():
            embed_key = f"{embed_name}.weight"
            n_vocab = checkpoint.shape(embed_key)[0]
            if tied and head_name in kept:  # the kept head reads the fp32 table: no int8 copy of it
                embedding.weight = torch.nn.Parameter(checkpoint.tensor(embed_key), requires_grad=False)
            else:
                packed = quantize_in_slices(lambda a, b: checkpoint.rows(embed_key, a, b), n_vocab, head_spec)
                set_module(model, embed_name, QuantizedEmbedding(packed.qweight, packed.scales))
            done = {embed_key}
            release_freed_memory()
            if tied:
                bias = checkpoint.tensor(f"{head_name}.bias") if f"{head_name}.bias" in names else None
                if head_name in kept:
                    head.weight = embedding.weight
                    set_module(model, head_name, FullPrecisionLinear(head))
                else:
                    set_module(model, head_name, head_layer(packed, bias))
                done |= {f"{head_name}.weight", f"{head_name}.bias"}
        return cls(model, checkpoint, converter_for(head_name), transform, kept, done)

    @torch.no_grad()
    def read(self, prefix: str = "", skip: str | None = None) -> None:
        """Every linear layer (quantized, or fp32 where kept) and parameter whose name starts with
        `prefix` and not with `skip`, from the checkpoint."""
        checkpoint, transform = self.checkpoint, self.transform
        wanted = lambda name: name.startswith(prefix) and not (skip and name.startswith(skip))  # noqa: E731
        linears = [(name, module, linear) for name, module in list(self.model.named_modules())
                   if (linear := as_linear(module)) is not None and f"{name}.weight" not in self.done and wanted(name)]
        progress = Progress(f"reading and quantizing {checkpoint.folder.name}: linear layers", len(linears))
        for name, module, linear in linears:
            conv1d = linear is not module  # GPT-2 stores the weight transposed
            key = f"{name}.weight"
            has_bias = f"{name}.bias" in self.names
            bias = transform(f"{name}.bias", checkpoint.tensor(f"{name}.bias"), 0) if has_bias else None
            if name in self.kept:
                full = torch.nn.Linear(*checkpoint.shape(key, conv1d)[::-1], bias=bias is not None)
                full.weight.copy_(transform(key, checkpoint.rows(key, 0, checkpoint.shape(key, conv1d)[0], conv1d), 0))
                if bias is not None:
                    full.bias.copy_(bias)
                set_module(self.model, name, FullPrecisionLinear(full))
            else:
                n = checkpoint.shape(key, conv1d)[0]
                read = lambda a, b, key=key, conv1d=conv1d: transform(key, checkpoint.rows(key, a, b, conv1d), a)  # noqa: E731
                pack = lambda spec, read=read, n=n: quantize_in_slices(read, n, spec)  # noqa: E731
                set_module(self.model, name, self.convert(name, pack, bias))
            release_freed_memory()
            progress.step()

        for name, param in list(self.model.named_parameters()):
            if param.device.type == "meta" and wanted(name):
                parent_name, _, attr = name.rpartition(".")
                setattr(self.model.get_submodule(parent_name), attr,
                        torch.nn.Parameter(transform(name, checkpoint.tensor(name), 0), requires_grad=False))
        self.model.eval()  # the layers swapped in are built in training mode

"""SmoothQuant's first calibration without the fp32 model (or a whole candidate) in memory.

Calibrating needs the fp32 model's activations, and an `alpha: auto` search the calibration loss
of each alpha's quantized model, but neither needs all of a model's weights at once. The model
is built with its parameters on the meta device, the parts outside the decoder layers are read,
and each decoder layer holds real weights only while it runs (`one_layer_at_a_time`: a forward
pre-hook reads them from the checkpoint, a forward hook puts the meta ones back). Peak memory:
the embedding (fp32 for the maxima, int8 when scoring), one layer and one batch's activations;
for the 1B shape about 0.5 GB where the fp32 model is 4.3 GB and a candidate 1 GB. The samples
run as few batches (one per length for the maxima, one padded batch for a score), so each layer
is read once per batch, not once per sample.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from ..core.memory import release_freed_memory
from ..core.progress import Progress
from ..layers.quantized_linear import tile_model
from .calibration import CalibrationBatch, pad_into_one, stack_equal_lengths
from .checkpoint import Checkpoint, QuantizedLoad, missing_tensors, parameters_on_meta
from .hf import FP32
from .native_smoothquant import collect_activation_maxima, norms_fold

logger = logging.getLogger(__name__)
LAYERS = "model.layers."  # where smoothing_groups finds the decoder layers


@contextlib.contextmanager
def one_layer_at_a_time(layers: torch.nn.ModuleList, read: Callable[[int], None], what: str,
                        passes: int = 1) -> Iterator[None]:
    """While inside, layer i calls `read(i)` before it runs, and after it the submodules and
    parameters it had before (on meta) are put back, so what `read` made is freed. `what` names
    the work in the progress lines; `passes` is how many forward passes run inside."""
    saved: dict[int, list[tuple[torch.nn.Module, dict, dict]]] = {}
    progress = Progress(f"{what}: decoder layer passes", len(layers) * passes)

    def before(i: int, layer: torch.nn.Module) -> None:
        saved[i] = [(m, dict(m._modules), dict(m._parameters)) for m in layer.modules()]
        read(i)

    def after(i: int) -> None:
        for module, modules, parameters in saved.pop(i):
            module._modules.clear()
            module._modules.update(modules)
            module._parameters.clear()
            module._parameters.update(parameters)
        release_freed_memory()
        progress.step()

    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda module, args, i=i: before(i, module)))
        hooks.append(layer.register_forward_hook(lambda module, args, out, i=i: after(i)))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def activation_maxima(source: str, batches: list[CalibrationBatch]) -> dict[str, torch.Tensor] | None:
    """collect_activation_maxima of the fp32 model at `source`, one decoder layer in memory at a
    time. None where that cannot be done (no safetensors folder, a tensor the model needs is not
    in it, norms not known to fold the factors): the caller calibrates the fp32 model in memory."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    checkpoint = Checkpoint(folder)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), **FP32)
    if not norms_fold(model):  # also refuses, naming them, models without Llama-style layers
        return None
    names = [name for name, _ in model.model.named_parameters()]  # collect_activation_maxima runs no LM head
    missing = missing_tensors(model, checkpoint)  # the whole model's: scoring alphas reads the head too
    if missing:
        logger.info("SmoothQuant: %s is not in the checkpoint; calibrating the fp32 model in memory", missing[0])
        return None

    def read(prefix: str, skip: str | None = None) -> None:  # parameters only: the recording hooks sit on modules
        for key in (f"model.{name}" for name in names):
            if key.startswith(prefix) and not (skip and key.startswith(skip)):
                parent, _, attr = key.rpartition(".")
                model.get_submodule(parent)._parameters[attr] = torch.nn.Parameter(checkpoint.tensor(key),
                                                                                   requires_grad=False)

    read("model.", skip=LAYERS)
    with one_layer_at_a_time(model.model.layers, lambda i: read(f"{LAYERS}{i}."), "SmoothQuant activation maxima",
                             passes=len(stack_equal_lengths(batches))):
        maxima = collect_activation_maxima(model, batches)
    del model
    release_freed_memory()
    logger.info("SmoothQuant: activation maxima taken one fp32 layer at a time from %s", source)
    return maxima


@torch.inference_mode()
def calibration_loss(load: QuantizedLoad, batches: list[CalibrationBatch]) -> float:
    """Mean next-token cross-entropy of the model `load` reads, one quantized decoder layer at a
    time: calibration.calibration_loss without the whole candidate in memory (and with the
    logits of one sample at a time: a batch's would be samples x tokens x vocabulary floats)."""
    model = load.model
    load.read(skip=LAYERS)
    tile_model(model)  # the LM head, in the layout it is served in (3-4x faster at prefill)

    def read_layer(i: int) -> None:
        load.read(f"{LAYERS}{i}.")
        tile_model(model.model.layers[i])

    head = model.get_output_embeddings()
    batch = pad_into_one(batches)  # one pass: each layer is read and quantized once per alpha
    with one_layer_at_a_time(model.model.layers, read_layer, "SmoothQuant alpha candidate"):
        hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             position_ids=batch.position_ids, use_cache=False)[0]  # (B, T, hidden)
    total, count = 0.0, 0
    for states, ids, mask in zip(hidden, batch.input_ids, batch.attention_mask):
        n = int(mask.sum())
        logits = head(states[:n - 1]).float()  # (n - 1, vocab)
        total += float(F.cross_entropy(logits, ids[1:n], reduction="sum"))
        count += n - 1
    return total / max(count, 1)

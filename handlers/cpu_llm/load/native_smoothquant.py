"""SmoothQuant in plain PyTorch: migrate activation outliers into the weights, then W8A8.

Per input channel j of a group of linears that share one input, the smoothing factor is
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)
and X / s, W * s leave the product unchanged while flattening X's outlier channels, so
per-row int8 activations lose little. X / s is folded into whatever produces X: the RMSNorm
weight in front of q/k/v and of gate/up, and the rows of up_proj in front of down_proj
(down_proj's input is act(gate) * up). o_proj has no foldable producer under grouped-query
attention and is quantized unsmoothed.

The calibration result (per-channel activation maxima and the alpha chosen) is a JSON file,
cached like IPEX's qconfig summary, so a restart does not calibrate again. With it, the model is
smoothed while it streams from the checkpoint (`smoothing_while_loading`): every factor depends
only on the activation maxima and the original weights, and each tensor read gets the value
`apply_smoothing` would give it, so no fp32 model is ever held. A first calibration runs the
fp32 model one decoder layer at a time (streamed_calibration.py); `calibrate` here is the
in-memory fallback for checkpoints that cannot stream.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ..core.errors import QuantizationError
from .calibration import CalibrationBatch, calibration_loss, stack_equal_lengths

if TYPE_CHECKING:
    from .checkpoint import Checkpoint, Transform

logger = logging.getLogger(__name__)
FORMAT = "cpu-llm-native-smoothquant/1"
# Smoothing must not change the fp32 model's output beyond float rounding.
FOLD_TOLERANCE = 1e-3
# Norms computing weight * normalized(x), so that dividing the weight divides the output: where
# smoothing is folded while loading, without the fp32 model to check it on (check_smoothing_is_exact).
FOLDABLE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


def smoothing_groups(model: torch.nn.Module) -> list[tuple[str, list[str]]]:
    """(producer of the input, linears reading it) for each Llama-style decoder layer."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    wanted = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
              "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    if layers is None or not all(_has(layer, path) for layer in layers for path in wanted):
        raise QuantizationError(f"native SmoothQuant needs Llama-style decoder layers ({', '.join(wanted)}); "
                                f"{type(model).__name__} does not have them")
    groups = []
    for i in range(len(layers)):
        p = f"model.layers.{i}"
        groups += [
            (f"{p}.input_layernorm", [f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj"]),
            (f"{p}.post_attention_layernorm", [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]),
            (f"{p}.mlp.up_proj", [f"{p}.mlp.down_proj"]),
        ]
    return groups


def _has(module: torch.nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _forward(model: torch.nn.Module, batch: CalibrationBatch) -> torch.Tensor:
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 position_ids=batch.position_ids, use_cache=False)[0]


@torch.inference_mode()
def collect_activation_maxima(model: torch.nn.Module, batches: list[CalibrationBatch]) -> dict[str, torch.Tensor]:
    """Per-channel max |input| of each group's linears over every calibration token. Runs the
    decoder without its LM head (the logits are not needed), samples of one length as one batch
    (a layer streamed from the checkpoint is then read once per length, not once per sample)."""
    maxima: dict[str, torch.Tensor] = {}
    hooks = []
    for source, targets in smoothing_groups(model):
        def record(module, args, name=source):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            maxima[name] = torch.maximum(maxima[name], x) if name in maxima else x
        hooks.append(model.get_submodule(targets[0]).register_forward_pre_hook(record))
    try:
        for batch in stack_equal_lengths(batches):
            _forward(model.model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    return maxima


def smoothing_factors(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), over all weights reading channel j."""
    return factors_from_maxima(act_max, torch.stack([w.detach().abs().amax(0) for w in weights]).amax(0), alpha)


def factors_from_maxima(act_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    s = act_max.clamp(min=1e-5).pow(alpha) / w_max.float().clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


def norms_fold(model: torch.nn.Module) -> bool:
    """Whether the model's norms are known to absorb the factors, so that smoothing can be folded
    without the fp32 model to check it on (check_smoothing_is_exact); logged where not."""
    producers = [model.get_submodule(source) for source, _ in smoothing_groups(model)]
    norms = {type(p).__name__ for p in producers if not isinstance(p, torch.nn.Linear)}  # as apply_smoothing tells
    fold = norms <= set(FOLDABLE_NORMS)
    if not fold:
        logger.info("SmoothQuant: %s may not fold the smoothing factors; smoothing the fp32 model", sorted(norms))
    return fold


def smoothing_while_loading(model: torch.nn.Module, checkpoint: "Checkpoint", act_max: dict[str, torch.Tensor],
                            alpha: float, rows_per_read: int = 1024) -> "Transform | None":
    """For `model` built on the meta device and its `checkpoint`: the transform giving each
    tensor read the value apply_smoothing gives it (targets' columns x s, up_proj's rows and a
    norm's weight / s, in that order). None where the norms are not known to fold. Reads the
    targets once beforehand, `rows_per_read` rows at a time, for their column maxima."""
    groups = smoothing_groups(model)
    if not norms_fold(model):
        return None
    columns: dict[str, torch.Tensor] = {}  # weight key -> s its columns are multiplied by
    divided: dict[str, torch.Tensor] = {}  # norm weight, up_proj weight rows and bias -> s they are divided by
    for source, targets in groups:
        if source not in act_max:
            raise QuantizationError(f"the SmoothQuant calibration has no activation maxima for {source}: "
                                    "it was made for another model")
        w_max = None
        for target in targets:
            key = f"{target}.weight"
            n = checkpoint.shape(key)[0]
            for start in range(0, n, rows_per_read):
                part = checkpoint.rows(key, start, min(n, start + rows_per_read)).abs().amax(0)
                w_max = part if w_max is None else torch.maximum(w_max, part)
        s = factors_from_maxima(act_max[source], w_max, alpha)
        columns.update({f"{target}.weight": s for target in targets})
        divided.update({f"{source}.weight": s, f"{source}.bias": s})

    def transform(key: str, rows: torch.Tensor, start: int) -> torch.Tensor:
        if key in columns:
            rows = rows * columns[key][None, :]
        if key in divided:
            s = divided[key][start:start + rows.shape[0]]
            rows = rows / (s[:, None] if rows.dim() == 2 else s)
        return rows

    return transform


@torch.inference_mode()
def apply_smoothing(model: torch.nn.Module, act_max: dict[str, torch.Tensor], alpha: float) -> None:
    """Fold the smoothing factors into producers (divide) and consumers (multiply), in place."""
    for source, targets in smoothing_groups(model):
        if source not in act_max:
            raise QuantizationError(f"the SmoothQuant calibration has no activation maxima for {source}: "
                                    "it was made for another model")
        linears = [model.get_submodule(t) for t in targets]
        s = smoothing_factors(act_max[source], [lin.weight for lin in linears], alpha)
        producer = model.get_submodule(source)
        if isinstance(producer, torch.nn.Linear):  # up_proj: scale its output rows
            producer.weight.div_(s[:, None])
            if producer.bias is not None:
                producer.bias.div_(s)
        else:  # RMSNorm: y = x_normed * weight
            producer.weight.div_(s)
        for lin in linears:
            lin.weight.mul_(s[None, :])


def check_smoothing_is_exact(model: torch.nn.Module, smoothed: torch.nn.Module, batch: CalibrationBatch) -> None:
    """Smoothing is an identity in exact arithmetic; if the output moved, the architecture's
    norm does something else with its weight (e.g. Gemma's 1 + weight) and folding is wrong."""
    with torch.inference_mode():
        before, after = _forward(model, batch), _forward(smoothed, batch)
    drift = float((after - before).abs().max() / before.abs().max())
    if drift > FOLD_TOLERANCE:
        raise QuantizationError(f"SmoothQuant folding changed the fp32 output by {drift:.2e} (relative); "
                                f"{type(model).__name__}'s norms cannot absorb the smoothing factors")


def save_calibration(path: Path, act_max: dict[str, torch.Tensor], alpha: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "alpha": alpha,
               "activation_max": {name: [round(v, 6) for v in t.tolist()] for name, t in act_max.items()}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)  # a crashed calibration never leaves a half-written cache entry


def load_calibration(path: Path) -> tuple[dict[str, torch.Tensor], float]:
    """Read a saved calibration; ValueError if the file is not one (an IPEX summary, say)."""
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON ({error})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a native SmoothQuant calibration (format {payload.get('format')!r}, "
                                f"expected {FORMAT!r}); an IPEX qconfig summary only works with backend: ipex")
    return {name: torch.tensor(v) for name, v in payload["activation_max"].items()}, float(payload["alpha"])


def calibrate(model: torch.nn.Module, batches: list[CalibrationBatch], alphas: list[float],
              quantize: Callable[[torch.nn.Module], None], path: Path) -> tuple[dict[str, torch.Tensor], float]:
    """Calibrate the fp32 model in memory (where the checkpoint cannot be streamed): activation
    maxima, then, with several alphas, the one whose quantized copy has the lowest calibration loss."""
    act_max = collect_activation_maxima(model, batches)

    def smoothed(alpha: float) -> torch.nn.Module:
        candidate = copy.deepcopy(model)
        apply_smoothing(candidate, act_max, alpha)
        return candidate

    def loss_of(alpha: float) -> float:
        candidate = smoothed(alpha)
        quantize(candidate)
        return calibration_loss(candidate, batches, lambda n: None)

    check_smoothing_is_exact(model, smoothed(alphas[0]), batches[0])
    return choose_and_save(act_max, alphas, loss_of, path, len(batches))


def choose_and_save(act_max: dict[str, torch.Tensor], alphas: list[float], loss_of: Callable[[float], float],
                    path: Path, samples: int) -> tuple[dict[str, torch.Tensor], float]:
    """The alpha with the lowest `loss_of` (no search for one alpha), saved to `path` with the
    maxima; returned as saved (rounded): what this load serves is what every later one will."""
    losses = {}
    started = time.monotonic()
    for alpha in alphas if len(alphas) > 1 else []:
        losses[alpha] = loss_of(alpha)
        elapsed = time.monotonic() - started
        logger.info("SmoothQuant alpha=%.2f: calibration loss %.4f (candidate %d/%d, %.0f s, ~%.0f s left)", alpha,
                    losses[alpha], len(losses), len(alphas), elapsed, elapsed / len(losses) * (len(alphas) - len(losses)))
    best = min(losses, key=losses.get) if losses else alphas[0]
    save_calibration(path, act_max, best)
    logger.info("SmoothQuant: calibrated with alpha=%.2f on %d samples -> %s", best, samples, path)
    return load_calibration(path)

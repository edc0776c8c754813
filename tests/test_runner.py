"""Our model runner: its ops against their PyTorch twins, weight fusion, and the Llama forward
pass against the Hugging Face path (greedy tokens, perplexity, batch invariance, slots, chunked
prefill)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from cpu_llm import kernels
from cpu_llm.api.prompt import encode_prompt
from cpu_llm.api.request import parse_request
from cpu_llm.config.serving import ServingConfig, parse_serving_config
from cpu_llm.core.errors import ConfigError
from cpu_llm.decode.sequence import Sequence
from cpu_llm.engine.select import engine_for
from cpu_llm.engine.slot_engine import SlotEngine
from cpu_llm.formats.quantlib import QuantSpec
from cpu_llm.layers.fuse import Concat, FullPrecisionGroup, fuse_linears
from cpu_llm.layers.quantized_linear import FullPrecisionLinear, QuantizedLinear
from cpu_llm.load.pipeline import load_for_serving
from cpu_llm.load.served import ServedModel
from cpu_llm.runner.model_runner import ModelRunner, attach_runner
from conftest import ROOT

pytestmark = pytest.mark.skipif(not kernels.kernels_available(), reason="kernels not built")
GOLDEN = Path(__file__).parent / "data" / "golden_greedy.json"
CONFIG = ServingConfig(max_new_tokens=64)


# --- ops ------------------------------------------------------------------------------------

@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 32), (8, 2, 128), (2, 1, 8)])
def test_slot_attention_matches_its_reference(heads, kv_heads, head_dim):
    torch.manual_seed(heads)
    slots, length = 4, 40
    cos, sin = torch.randn(length, head_dim // 2), torch.randn(length, head_dim // 2)
    cases = [([2], [0]), ([0, 1, 3], [5, 0, 17]), ([1] * 12 + [3], list(range(12)) + [39])]  # decode, prefill chunk
    for slot_list, pos_list in cases:
        qkv = torch.randn(len(slot_list), (heads + 2 * kv_heads) * head_dim)
        k, v = torch.randn(slots, kv_heads, length, head_dim), torch.randn(slots, kv_heads, length, head_dim)
        k2, v2 = k.clone(), v.clone()
        args = (torch.tensor(pos_list), torch.tensor(slot_list))
        got = kernels.slot_attention(qkv, cos, sin, *args, k, v, heads, kv_heads, 0.3)
        want = kernels.slot_attention_reference(qkv, cos, sin, *args, k2, v2, heads, kv_heads, 0.3)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(k, k2) and torch.equal(v, v2)  # the same cache writes, nothing else touched


def test_slot_attention_rows_do_not_depend_on_their_batch():
    torch.manual_seed(0)
    cos, sin = torch.randn(64, 32), torch.randn(64, 32)
    k, v = torch.randn(3, 2, 64, 64), torch.randn(3, 2, 64, 64)
    qkv = torch.randn(3, 8 * 64)
    together = kernels.slot_attention(qkv, cos, sin, torch.tensor([9, 30, 4]), torch.tensor([0, 1, 2]),
                                  k.clone(), v.clone(), 4, 2, 0.125)
    alone = kernels.slot_attention(qkv[1:2], cos, sin, torch.tensor([30]), torch.tensor([1]), k.clone(), v.clone(),
                               4, 2, 0.125)
    assert torch.equal(together[1:2], alone)


def test_slot_attention_names_what_is_wrong():
    cos = sin = torch.zeros(8, 32)
    k = v = torch.zeros(2, 2, 8, 64)
    good = dict(qkv=torch.zeros(1, 8 * 64), positions=torch.tensor([0]), slots=torch.tensor([0]))
    call = lambda **kw: kernels.slot_attention(kw["qkv"], cos, sin, kw["positions"], kw["slots"], k, v, 4, 2, 1.0)  # noqa: E731
    with pytest.raises(RuntimeError, match="qkv has 100 columns"):
        call(**{**good, "qkv": torch.zeros(1, 100)})
    with pytest.raises(RuntimeError, match="position 8, beyond the cache length 8"):
        call(**{**good, "positions": torch.tensor([8])})
    with pytest.raises(RuntimeError, match="slot 2 of 2"):
        call(**{**good, "slots": torch.tensor([2])})
    with pytest.raises(RuntimeError, match="positions must be a contiguous int64"):
        call(**{**good, "positions": torch.tensor([0.0])})


@pytest.mark.parametrize("isa", kernels.supported_isas())
@pytest.mark.parametrize("rows,width", [(1, 576), (7, 100), (33, 2048), (1, 8192)])
def test_norm_and_activation_ops_match_their_references(rows, width, isa):
    """On every ISA the host runs (vectorized bodies, tails of 1..7 values included)."""
    best = kernels.current_isa()
    kernels.set_isa(isa)
    try:
        _check_norm_and_activation(rows, width)
    finally:
        kernels.set_isa(best)


def _check_norm_and_activation(rows: int, width: int) -> None:
    torch.manual_seed(rows)
    x, delta, weight = torch.randn(rows, width), torch.randn(rows, width), torch.randn(width)
    torch.testing.assert_close(kernels.rms_norm(x, weight, 1e-5), kernels.rms_norm_reference(x, weight, 1e-5))
    residual = x.clone()
    normed = kernels.add_rms_norm_(residual, delta, weight, 1e-5)
    assert torch.equal(residual, x + delta)  # the residual stream is updated in place
    torch.testing.assert_close(normed, kernels.rms_norm_reference(x + delta, weight, 1e-5))
    gate_up = torch.randn(rows, 2 * width) * 30  # gates far into both tails of exp
    torch.testing.assert_close(kernels.silu_mul(gate_up), kernels.silu_mul_reference(gate_up))
    extremes = torch.tensor([[-200.0, -88.5, -1e-30, 0.0, 1e-30, 88.5, 200.0] + [1.0] * 7])
    torch.testing.assert_close(kernels.silu_mul(extremes), kernels.silu_mul_reference(extremes))
    with pytest.raises(RuntimeError, match="weight must be a contiguous float32 tensor of"):
        kernels.rms_norm(x, torch.randn(width + 1), 1e-5)


# --- fusion ---------------------------------------------------------------------------------

def _linears(bias: list[bool], rows=(64, 32, 32), k=96) -> list[torch.nn.Linear]:
    torch.manual_seed(len(bias))
    return [torch.nn.Linear(k, n, bias=b).eval() for n, b in zip(rows, bias)]


@pytest.mark.parametrize("spec", [QuantSpec(bits=8), QuantSpec(bits=4, granularity="group", group_size=32, scale_dtype="float16"),
                                  QuantSpec(bits=4, granularity="group", group_size=32, scheme="affine")])
def test_fused_quantized_projection_equals_its_parts(spec):
    parts = [QuantizedLinear.from_linear(linear, spec, compute="int8") for linear in _linears([True, False, True])]
    fused = fuse_linears(parts)
    assert isinstance(fused, QuantizedLinear) and fused.out_features == 128
    x = torch.randn(5, 96)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], -1))


def test_fp32_and_mixed_projections_run_side_by_side():
    """Full-precision parts (memory-mapped by transformers) and parts of different kinds are not
    copied into one weight: they run side by side."""
    parts = _linears([False, False, False])
    x = torch.randn(3, 96)
    with torch.inference_mode():
        for group in (parts, [FullPrecisionLinear(p) for p in parts],
                      [parts[0], QuantizedLinear.from_linear(parts[1], QuantSpec(bits=8)), parts[2]]):
            fused = fuse_linears(group)
            assert isinstance(fused, Concat) and all(a is b for a, b in zip(fused.parts, group))
            assert torch.equal(fused(x), torch.cat([p(x) for p in group], -1))


@pytest.mark.parametrize("rows", [1, 8, 9])
def test_fp32_parts_on_our_kernel_are_one_call_over_the_weights_in_place(rows):
    parts = [FullPrecisionLinear(p, use_kernel=True) for p in _linears([True, False, True], rows=(48, 16, 16))]
    group = fuse_linears(parts)
    assert isinstance(group, FullPrecisionGroup) and all(w is p.weight for w, p in zip(group.weights, parts))
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        torch.testing.assert_close(group(x), torch.cat([F.linear(x, p.weight, p.bias) for p in parts], -1))
    with pytest.raises(RuntimeError, match=r"every weight must be a contiguous float32 \[N, K = 96\]"):
        kernels.linear_f32_cat(x, [parts[0].weight, torch.zeros(4, 95)], None)


# --- the model ------------------------------------------------------------------------------

def _seqs(info, bodies):
    requests = [parse_request(body, CONFIG) for body in bodies]
    return [Sequence.start(r, encode_prompt(info.tokenizer, r, CONFIG.max_prompt_tokens)) for r in requests]


def test_runner_generates_the_recorded_greedy_tokens(loaded, runner_served):
    """The golden tokens come from transformers' generate(); our forward pass must give them too."""
    golden = json.loads(GOLDEN.read_text())
    bodies = [{"messages": c["messages"], "max_new_tokens": golden["max_new_tokens"]} for c in golden["cases"]]
    results = engine_for(runner_served, loaded[1]).generate(_seqs(loaded[1], bodies))
    for case, result in zip(golden["cases"], results):
        expected = [t for t in case["tokens"] if t not in loaded[1].eos_ids]
        assert list(result.token_ids) == expected[:len(result.token_ids)] and len(result.token_ids) >= len(expected)


def test_runner_perplexity_matches_the_hugging_face_path(loaded, runner_served):
    sys.path.insert(0, str(ROOT / "scripts"))
    from evaluate import TEXT, perplexity

    text = TEXT.read_text()[:6000]
    hf = perplexity(ServedModel(loaded[0], lambda n: None, "native", {}), loaded[1].tokenizer, text)
    ours = perplexity(runner_served, loaded[1].tokenizer, text)
    assert hf["scored_tokens"] == ours["scored_tokens"] > 500
    assert abs(ours["perplexity"] / hf["perplexity"] - 1) < 1e-3


BODIES = [
    {"prompt": "The history of the Roman empire", "max_new_tokens": 20},
    {"messages": [{"role": "user", "content": "Write a haiku about CPUs."}], "max_new_tokens": 16},
    {"prompt": "def fibonacci(n):", "max_new_tokens": 12, "repetition_penalty": 1.3},
]


def _alone_and_together(served, info) -> tuple[list, list]:
    alone = [engine_for(served, info).generate(_seqs(info, [body]))[0].token_ids for body in BODIES]
    together = [r.token_ids for r in engine_for(served, info).generate(_seqs(info, BODIES))]
    return alone, together


@pytest.mark.parametrize("config", ["woq-int8.yaml", "woq-int4.yaml"])
def test_quantized_runner_rows_are_exactly_batch_invariant(model_dir, config):
    """No padding and row-independent kernels: with our runner even int8 compute gives a request
    the same tokens alone and in a batch, prefilled in any chunk size."""
    raw = yaml.safe_load((ROOT / "configs" / config).read_text())
    raw["quantization"]["backend"] = "native"  # the runner serves the native backend only
    served, info = load_for_serving(str(model_dir), parse_serving_config(raw).quantization, str(ROOT))
    attach_runner(served, "llama", slots=4, length=256, prefill_chunk=256)
    assert served.report["runner"] == "llama"
    alone, together = _alone_and_together(served, info)
    served.runner.prefill_chunk = 5
    _, chunked = _alone_and_together(served, info)
    assert alone == together == chunked


@pytest.mark.skipif(not kernels.kernels_available(), reason="the decoder stack runs on the compiled kernels")
@pytest.mark.parametrize("config", [None, "woq-int8.yaml", "woq-int4.yaml", "smoothquant.yaml"])
def test_the_decoder_stack_gives_the_python_loops_logits_bitwise(model_dir, config):
    """The C++ stack calls the same ops on the same tensors as the Python layers: prefill and
    decode logits of two slots must be equal to the bit, in every mode."""
    raw = yaml.safe_load((ROOT / "configs" / config).read_text()) if config else {}
    raw.setdefault("quantization", {})["backend"] = "native"  # auto picks IPEX for fp32 in the ipex stack
    served, _ = load_for_serving(str(model_dir), parse_serving_config(raw).quantization, str(ROOT))
    attach_runner(served, "llama", slots=2, length=64, prefill_chunk=64)
    model = served.model
    assert model.stack is not None and model.stack.layers() == len(model.layers)
    assert served.report["decoder_stack"] == "c++"
    if config:  # quantized weights are ours, in the huge-page arena (fp32 ones stay memory-mapped)
        assert served.report["weights_arena"]["packed_mib"] > 0

    def run(runner: ModelRunner) -> list[torch.Tensor]:
        prompt = list(range(300, 305))  # 5 tokens: prefill rows above the fp32 kernels' 8-row limit too
        out = [runner.run(prompt * 2, list(range(5)) * 2, [0] * 5 + [1] * 5, [4, 9])]
        for step in range(3):
            out.append(runner.run([17 + step, 40 + step], [5 + step] * 2, [0, 1], [0, 1]))
        return out

    with_stack = run(ModelRunner(model, slots=2, length=64, prefill_chunk=64))
    with model.python_loop():
        without = run(ModelRunner(model, slots=2, length=64, prefill_chunk=64))
    assert all(torch.equal(a, b) for a, b in zip(with_stack, without))


def test_the_decoder_stack_names_what_is_missing():
    stack = torch.classes.cpu_llm.DecoderStack(4, 2, 0.125, 1e-5)
    with pytest.raises(RuntimeError, match="heads .3. must be a positive multiple of kv_heads"):
        torch.classes.cpu_llm.DecoderStack(3, 2, 0.125, 1e-5)
    with pytest.raises(RuntimeError, match="add_layer first"):
        stack.set_linear(0, kernels.STACK_BLAS, [torch.zeros(4, 4)], None, 0, 0, 0.0, False)
    stack.add_layer(torch.ones(4), torch.ones(4))
    with pytest.raises(RuntimeError, match="kind 0 takes 2-2 tensors, got 1"):
        stack.set_linear(0, kernels.STACK_TILED, [torch.zeros(4, 4)], None, 8, 4, 0.0, False)
    stack.set_linear(0, kernels.STACK_BLAS, [torch.zeros(32, 4)], None, 0, 0, 0.0, False)
    cache = torch.zeros(1, 1, 2, 8, 8)
    with pytest.raises(RuntimeError, match="layer 0 has no o projection"):
        stack.forward(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                      torch.zeros(8, 4), torch.zeros(8, 4), cache, cache)


def test_requests_wait_for_a_free_slot(loaded, runner_served):
    """More requests than slots: the extra ones are prefilled as slots come back."""
    small = ModelRunner(runner_served.model, slots=2, length=256, prefill_chunk=64)
    engine = SlotEngine(small, loaded[1], request_timeout_s=600)
    results = engine.generate(_seqs(loaded[1], BODIES))
    assert [r.token_ids for r in results] == _alone_and_together(runner_served, loaded[1])[0]
    assert max(r.batch_size for r in results) == 3 and len(small.cache.free) == 2


def test_an_error_mid_batch_gives_the_slots_back(loaded, runner_served, monkeypatch):
    runner = runner_served.runner
    engine = SlotEngine(runner, loaded[1], request_timeout_s=600)
    calls = []

    def fail_on_second_step(seqs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("client write failed")

    with pytest.raises(RuntimeError, match="client write failed"):
        engine.generate(_seqs(loaded[1], BODIES), on_step=fail_on_second_step)
    assert engine.in_flight == 0 and len(runner.cache.free) == runner.cache.slots


def test_a_long_prompt_is_prefilled_in_chunks_while_running_requests_keep_decoding(loaded, runner_served):
    info = loaded[1]
    engine = SlotEngine(runner_served.runner, info, request_timeout_s=600)
    running = _seqs(info, [{"prompt": "Hello", "max_new_tokens": 40}])[0]
    engine.step({"running": running}, set())  # prefilled (short) and its first token
    long_prompt = {"prompt": "word " * 100, "max_new_tokens": 4}
    newcomer = _seqs(info, [long_prompt])[0]
    chunks = -(-len(newcomer.prompt_ids) // runner_served.runner.prefill_chunk)
    engine.step({"long": newcomer}, {"running"})
    for _ in range(chunks - 1):
        before = len(running.generated)
        assert not newcomer.generated
        engine.step({}, {"running", "long"})
        assert len(running.generated) == before + 1  # one token per step, prefill or not
    assert len(newcomer.generated) == 1 and newcomer.prefill_ms > 0
    while engine.in_flight:
        engine.step({}, set(engine.seqs))
    assert len(runner_served.runner.cache.free) == runner_served.runner.cache.slots


# --- choosing the runner --------------------------------------------------------------------

def test_runner_choice_falls_back_or_fails_with_the_reason():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).eval()
    served = ServedModel(gpt2, lambda n: None, "native", {})
    with pytest.raises(ConfigError, match=r"handler\.runner.*GPT2LMHeadModel is not one of"):
        attach_runner(served, "llama", slots=1, length=64, prefill_chunk=16)
    attach_runner(served, "auto", slots=1, length=64, prefill_chunk=16)
    assert served.runner is None and served.report["runner"] == "hf" and served.model is gpt2


def test_a_bf16_model_stays_on_the_hugging_face_path_and_a_small_llama_runs_on_ours():
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=100, max_position_embeddings=64)
    torch.manual_seed(0)
    bf16 = ServedModel(LlamaForCausalLM(config).eval().to(torch.bfloat16), lambda n: None, "native", {})
    attach_runner(bf16, "auto", slots=2, length=32, prefill_chunk=8)
    assert bf16.runner is None and bf16.report["runner"] == "hf"
    hf = LlamaForCausalLM(config).eval()
    ids = torch.tensor([[5, 17, 3, 99, 42, 8]])
    with torch.inference_mode():
        expected = hf(ids).logits[0]  # (T, vocab)
    served = ServedModel(hf, lambda n: None, "native", {})
    attach_runner(served, "llama", slots=2, length=32, prefill_chunk=8)
    positions = list(range(6))
    got = served.runner.run(ids[0].tolist(), positions, [1] * 6, positions)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_runner_keys_are_validated():
    with pytest.raises(ConfigError, match=r"handler\.runner.*auto, llama, hf"):
        parse_serving_config({"handler": {"runner": "fast"}})
    with pytest.raises(ConfigError, match=r"handler\.prefill_chunk_tokens"):
        parse_serving_config({"handler": {"prefill_chunk_tokens": 0}})
    config = parse_serving_config({"batchSize": 16, "handler": {"runner": "hf"}})
    assert (config.runner, config.batch_size, config.prefill_chunk_tokens) == ("hf", 16, 256)

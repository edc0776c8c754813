"""Locust load test for the LLM endpoint: tokens/s and latency, as users of LLM servers measure them.

Two load shapes (pick the user class on the command line):
- `ConcurrentUsers`: fixed concurrency, each user sends its next request as soon as the last ends
  (`-u 8` = 8 requests in flight);
- `PoissonArrivals`: fixed arrival rate, requests arrive with exponential gaps at `--arrival-rate`
  per second whether or not earlier ones have finished (run it with `-u 1`).

Prompt and output lengths are drawn per request from `--prompt-tokens` / `--output-tokens`
(`128`, `32-256` uniform, or `normal:128:32`); prompts are cut from English text to the exact
token count with the model's own tokenizer (`tokenizers`, no torch: Locust's gevent patching and
torch do not mix). `ignore_eos` makes the output length exact.

Besides Locust's per-request rows (`generate`, `generate-stream`: requests/s, failures; their
response time is Locust's time to the response headers, which for a stream is its first chunk),
every finished request adds rows of type METRIC, whose "response time" column holds the figure
named (Locust can only aggregate response times):
- `end_to_end_latency_ms` (sending the request -> its last byte);
- `time_to_first_token_ms` (streamed requests, first text line seen by the client);
- `inter_token_latency_ms` (mean per request: streamed from the client's clock, plain from the
  server's decode timings);
- `output_tokens_per_s` (per request: output tokens / end-to-end latency); its "content size" is
  the request's output tokens, so the row's total size / run time = total output tokens/s.

    locust -f load_tests/locustfile.py ConcurrentUsers --host http://127.0.0.1:8080 \\
        --headless -u 4 -r 4 -t 60s --prompt-tokens 32-256 --output-tokens 64 --stream-share 1

`--api openai` sends the same requests to an OpenAI-compatible `POST <--openai-path>/completions`
instead (our server: `--openai-path /predictions/<model>/<version>/v1`; llama-server, vLLM and
others: the default `/v1`), so one run can measure any such server. Output tokens are counted
from the response's `usage` (streams ask for it with `stream_options.include_usage`). Plain
(non-streamed) OpenAI responses carry no server timings, so they add no inter-token latency.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import gevent
from gevent.pool import Group
from locust import HttpUser, constant, events, task
from requests.adapters import HTTPAdapter
from requests.exceptions import RequestException

ROOT = Path(__file__).resolve().parent.parent
TEXT_SOURCES = [ROOT / "eval" / "heldout.txt", ROOT / "calibration" / "calibration.jsonl"]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2", help="model name: POST /predictions/<model>")
    parser.add_argument("--prompt-tokens", default="32-256", help="N, A-B (uniform) or normal:MEAN:STD")
    parser.add_argument("--output-tokens", default="64", help="N, A-B (uniform) or normal:MEAN:STD")
    parser.add_argument("--stream-share", type=float, default=1.0, help="share of requests sent with stream: true")
    parser.add_argument("--length-control", choices=["ignore_eos", "min_new_tokens", "none"], default="ignore_eos",
                        help="how output lengths are enforced")
    parser.add_argument("--arrival-rate", type=float, default=1.0, help="requests/s for PoissonArrivals")
    parser.add_argument("--tokenizer", default=str(ROOT / "models" / "SmolLM2-135M-Instruct" / "tokenizer.json"),
                        help="tokenizer.json of the served model (prompt lengths in its tokens)")
    parser.add_argument("--auth-token", default="", help="TorchServe inference key (Authorization: Bearer)")
    parser.add_argument("--api", choices=["native", "openai"], default="native",
                        help="native: POST /predictions/<model>; openai: POST <--openai-path>/completions")
    parser.add_argument("--openai-path", default="/v1", help="path of the OpenAI API on --host (--api openai)")


class Lengths:
    """A length distribution parsed from `N`, `A-B` or `normal:MEAN:STD` (at least 1 token)."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        if spec.startswith("normal:"):
            mean, std = map(float, spec.split(":")[1:])
            self.draw = lambda: max(1, round(random.gauss(mean, std)))
        elif "-" in spec:
            low, high = map(int, spec.split("-"))
            self.draw = lambda: random.randint(low, high)
        else:
            self.draw = lambda: int(spec)


class Prompts:
    """Prompts of an exact token count, cut from English text with the served model's tokenizer."""

    def __init__(self, tokenizer_file: str) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(tokenizer_file)
        text = " ".join(_texts())
        self.ids = self.tokenizer.encode(text, add_special_tokens=False).ids

    def make(self, tokens: int) -> str:
        start = random.randrange(0, max(1, len(self.ids) - tokens))
        return self.tokenizer.decode(self.ids[start:start + tokens])


def _texts() -> list[str]:
    texts = []
    for path in TEXT_SOURCES:
        for line in path.read_text().splitlines():
            texts.append(json.loads(line)["text"] if path.suffix == ".jsonl" else line)
    return [t for t in texts if t.strip()] * 4  # long enough for prompts of a few thousand tokens


_prompts: Prompts | None = None


@events.test_start.add_listener
def _load_tokenizer(environment, **_) -> None:
    global _prompts
    _prompts = Prompts(environment.parsed_options.tokenizer)


def _metric(environment, name: str, value: float, size: int = 0) -> None:
    environment.events.request.fire(request_type="METRIC", name=name, response_time=value,
                                    response_length=size, exception=None, context={})


class LLMClient(HttpUser):
    abstract = True

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.prompt_lengths, self.output_lengths = Lengths(options.prompt_tokens), Lengths(options.output_tokens)
        self.openai = options.api == "openai"
        self.url = f"{options.openai_path.rstrip('/')}/completions" if self.openai else f"/predictions/{options.model}"
        self.headers = {"Content-Type": "application/json"}
        if options.auth_token:
            self.headers["Authorization"] = f"Bearer {options.auth_token}"
        self.client.mount("http://", HTTPAdapter(pool_maxsize=256))

    def body(self) -> dict:
        options = self.environment.parsed_options
        tokens = self.output_lengths.draw()
        body = {"prompt": _prompts.make(self.prompt_lengths.draw()), "max_new_tokens": tokens,
                "stream": random.random() < options.stream_share}
        if options.length_control == "ignore_eos":
            body["ignore_eos"] = True
        elif options.length_control == "min_new_tokens":
            body["min_new_tokens"] = tokens
        if self.openai:  # the same request in OpenAI's words; greedy, as the native default
            body.update(model=options.model, max_tokens=body.pop("max_new_tokens"), temperature=0)
            if "min_new_tokens" in body:
                body["min_tokens"] = body.pop("min_new_tokens")
            if body["stream"]:
                body["stream_options"] = {"include_usage": True}
        return body

    def read_stream(self, response) -> tuple[float | None, dict | None]:
        """Time of the first text and the final summary ({completion_tokens, timings?}) of a stream:
        JSON lines (native) or Server-Sent Events (OpenAI), parsed as the chunks arrive."""
        first = final = None
        separator = b"\n\n" if self.openai else b"\n"
        buffered = b""
        for data in response.iter_content(chunk_size=None):  # each chunk as it arrives
            buffered += data
            *events, buffered = buffered.split(separator)
            for event in filter(None, (e.strip() for e in events)):
                if self.openai:
                    payload = event.split(b":", 1)[1].strip()  # "data: {...}" or "data:{...}"
                    if payload == b"[DONE]":
                        continue
                    chunk = json.loads(payload)
                    text = "".join(c.get("text", "") for c in chunk.get("choices", []))
                    if chunk.get("usage"):
                        final = chunk["usage"]
                else:
                    chunk = json.loads(event)
                    text = chunk.get("text")
                    if "finish_reason" in chunk:
                        final = chunk
                if first is None and text:
                    first = time.perf_counter()
        return first, final

    def generate(self) -> None:
        body = self.body()
        name = "generate-stream" if body["stream"] else "generate"
        sent = time.perf_counter()
        first = None
        with self.client.post(self.url, data=json.dumps(body), headers=self.headers, name=name,
                              stream=body["stream"], catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            if body["stream"]:
                try:
                    first, final = self.read_stream(response)
                except (RequestException, ValueError) as error:  # cut mid-stream (the server died)
                    response.failure(f"stream cut: {type(error).__name__}: {error}")
                    return
            else:
                final = response.json()
                final = final.get("usage") if self.openai else final
            if final is None or "completion_tokens" not in final:
                response.failure("response ended without a token count")
                return
            response.success()
        self.report(final, sent, first, time.perf_counter())

    def report(self, final: dict, sent: float, first: float | None, end: float) -> None:
        tokens = final["completion_tokens"]
        _metric(self.environment, "end_to_end_latency_ms", (end - sent) * 1000)
        _metric(self.environment, "output_tokens_per_s", tokens / (end - sent), size=tokens)
        if first is not None:
            _metric(self.environment, "time_to_first_token_ms", (first - sent) * 1000)
            if tokens > 1:
                _metric(self.environment, "inter_token_latency_ms", (end - first) * 1000 / (tokens - 1))
        elif tokens > 1 and "timings" in final:
            _metric(self.environment, "inter_token_latency_ms", final["timings"]["decode_ms"] / (tokens - 1))


class ConcurrentUsers(LLMClient):
    """Closed loop: `-u N` keeps N requests in flight."""

    wait_time = constant(0)

    @task
    def request(self) -> None:
        self.generate()


class PoissonArrivals(LLMClient):
    """Open loop: requests arrive at `--arrival-rate` per second (exponential gaps), however many are
    still in flight. Run with `-u 1`; at the end of the run the requests in flight are waited for."""

    wait_time = constant(0)

    def on_start(self) -> None:
        super().on_start()
        self.in_flight = Group()

    @task
    def arrivals(self) -> None:
        gevent.sleep(random.expovariate(self.environment.parsed_options.arrival_rate))
        self.in_flight.spawn(self.generate)

    def on_stop(self) -> None:
        self.in_flight.join()

"""What every engine is: `step()` advances the requests it holds by one forward pass, and
`generate()` is "step until finished", as in nano-vllm's LLMEngine.

Continuous batching calls `step()` once per TorchServe call (serving/continuous.py); dynamic
batching calls `generate()` on the same engine. So each backend has one decode loop, and the two
batching modes differ only in who drives it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

from ..decode.sequence import GenerationResult, Sequence


class Engine(ABC):
    """The in-flight requests of one worker, keyed by request id."""

    seqs: dict[str, Sequence]
    # Most requests generated together (None = no limit): 1 where a row's output could change with
    # its batch companions (IPEX SmoothQuant's int8 kernels).
    max_batch: int | None = None

    @property
    def in_flight(self) -> int:
        return len(self.seqs)

    @abstractmethod
    def step(self, new: dict[str, Sequence], wanted: set[str]) -> tuple[dict[str, Sequence], int]:
        """One forward pass over the running requests and the `new` ones; requests not in `wanted`
        are dropped first (their client went away). Returns the sequences touched (new and
        running) and how many were dropped."""

    @abstractmethod
    def clear(self) -> None:
        """Drop every request and give back what it holds."""

    def generate(self, seqs: list[Sequence], on_step: Callable[[list[Sequence]], None] | None = None
                 ) -> list[GenerationResult]:
        """Dynamic batching: run `seqs` until the last one finishes, in batches of `max_batch`;
        `on_step(batch)` runs after every step (streaming sends the new text from there)."""
        size = self.max_batch or max(len(seqs), 1)
        try:
            for start in range(0, len(seqs), size):
                batch = seqs[start:start + size]
                self.step({f"batch-{start + index}": seq for index, seq in enumerate(batch)}, set())
                while True:
                    if on_step is not None:
                        on_step(batch)
                    if not self.seqs:
                        break
                    self.step({}, set(self.seqs))
        finally:  # an error mid-batch must not keep the engine's rows or cache slots
            self.clear()
        return [seq.result() for seq in seqs]

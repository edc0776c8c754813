"""A request's prompt as token ids: plain text, or chat messages through the model's chat template."""

from __future__ import annotations

from ..core.errors import RequestError
from ..core.params import GenerationRequest


def encode_prompt(tokenizer, request: GenerationRequest, max_prompt_tokens: int) -> list[int]:
    """Token ids of the prompt (chat messages through the model's chat template)."""
    if request.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError("messages", "this model has no chat template; send 'prompt' instead")
        text = tokenizer.apply_chat_template(
            list(request.messages), tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False).input_ids
        field = "messages"
    else:
        ids = tokenizer(request.prompt).input_ids
        field = "prompt"
    if not ids:
        raise RequestError(field, "encodes to no tokens; send some text")
    if len(ids) > max_prompt_tokens:
        raise RequestError(
            field, f"is {len(ids)} tokens long; this server accepts at most {max_prompt_tokens}"
        )
    return ids

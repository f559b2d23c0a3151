"""The token ids that end a response: every EOS id of the model's generation config, as the reference rollout stops.

Qwen2.5-Instruct's ``generation_config.json`` lists ``<|im_end|>`` and ``<|endoftext|>``; the tokenizer's
``eos_token`` is only the first. The reference rollout (vLLM with the model's generation config) stops at either,
and a response that ends in ``<|endoftext|>`` then fails the reward's EOS rule (it must end with the tokenizer's
``eos_token`` string): it scores 0 ("over length"), so the policy learns not to emit it. Stopping at the
tokenizer's EOS alone would instead generate past ``<|endoftext|>`` and could reward
``…</answer><|endoftext|>…<|im_end|>``. ``rollout.eos_ids_from=tokenizer`` keeps that older behaviour.
"""

from __future__ import annotations

SOURCES = ("generation_config", "tokenizer")


def eos_token_ids(model_path: str, tokenizer, source: str = "generation_config") -> list[int]:
    """The ids that end a response: the tokenizer's ``eos_token_id`` first, then (``source="generation_config"``)
    every ``eos_token_id`` of the model's ``generation_config.json`` (an int or a list), without repeats.

    A model without a generation config (or a hub id not in the local cache) gives the tokenizer's id alone.

    Raises:
        ValueError: an unknown ``source``, or a tokenizer without an EOS token.
    """
    if source not in SOURCES:
        raise ValueError(f"rollout.eos_ids_from={source!r}: expected one of {list(SOURCES)}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: a response could never end")
    ids = [int(tokenizer.eos_token_id)]
    if source == "generation_config":
        from transformers import GenerationConfig

        try:
            config = GenerationConfig.from_pretrained(model_path)
        except OSError:  # no generation_config.json
            config = None
        listed = getattr(config, "eos_token_id", None)
        ids += [listed] if isinstance(listed, int) else [int(i) for i in listed or []]
    return list(dict.fromkeys(ids))

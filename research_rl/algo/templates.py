"""Prompt templates of ReSearch (arXiv 2503.19470, §2.1 and Table 1; text from the released code).

Two templates: ``base`` renders the raw conversation prompt for base models; ``instruct`` puts the system prompt
and the question through the tokenizer's chat template with ``add_generation_prompt=True``.
Prompts are returned as token ids: the rollout never re-tokenises text it has already turned into ids.
"""

from __future__ import annotations

SYSTEM_PROMPT = (
    "You are a helpful assistant that can solve the given question step by step with the help of the wikipedia "
    "search tool. Given a question, you need to first think about the reasoning process in the mind and then "
    "provide the answer. During thinking, you can invoke the wikipedia search tool to search for fact information "
    "about specific topics if needed. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags respectively, and the search query and result are enclosed within <search> </search> "
    "and <result> </result> tags respectively. For example, <think> This is the reasoning process. </think> "
    "<search> search query here </search> <result> search result here </result> <think> This is the reasoning "
    "process. </think> <answer> The final answer is \\[ \\boxed{answer here} \\] </answer>. In the last part of "
    "the answer, the final exact answer is enclosed within \\boxed{} with latex format."
)

BASE_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "During thinking, the assistant can invoke the wikipedia search tool to search for fact information about "
    "specific topics if needed. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags respectively, and the search query and result are enclosed within <search> </search> "
    "and <result> </result> tags respectively. For example, <think> This is the reasoning process. </think> "
    "<search> search query here </search> <result> search result here </result> <think> This is the reasoning "
    "process. </think> <answer> The final answer is \\[ \\boxed{answer here} \\] </answer>. In the last part of "
    "the answer, the final exact answer is enclosed within \\boxed{} with latex format. User: {prompt}. Assistant:"
)


def render_prompt(question: str, template: str, tokenizer) -> str:
    """The prompt text for one question.

    Args:
        question: the question as in the dataset.
        template: ``"base"`` (raw text) or ``"instruct"`` (system prompt + chat template).
        tokenizer: a Hugging Face tokenizer; for ``instruct`` it must carry a chat template.
    Raises:
        ValueError: unknown template, or ``instruct`` with a tokenizer that has no chat template.
    """
    if template == "base":
        return BASE_TEMPLATE.replace("{prompt}", question)
    if template == "instruct":
        return chat_prompt(SYSTEM_PROMPT, question, tokenizer)
    raise ValueError(f"unknown template {template!r}; expected 'base' or 'instruct'")


def chat_prompt(system: str, user: str, tokenizer) -> str:
    """A system + user turn through the tokenizer's chat template, ending with the assistant generation prompt.

    Raises:
        ValueError: the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("model.template=instruct needs a tokenizer with a chat template; use model.template=base")
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompt(question: str, template: str, tokenizer) -> list[int]:
    """Prompt token ids (no extra special tokens beyond what the template renders)."""
    return tokenizer.encode(render_prompt(question, template, tokenizer), add_special_tokens=False)

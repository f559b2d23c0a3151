"""Build the tiny debug policy: a byte-level BPE tokenizer trained on the shipped corpus and a randomly
initialised ``Qwen2ForCausalLM`` built from a config, saved together in Hugging Face format.

No weights can be downloaded in debug mode, so this stands in for ``Qwen/Qwen2.5-*-Instruct``. It is shaped
like one: ChatML special tokens (``<|im_start|>``, ``<|im_end|>`` = EOS, ``<|endoftext|>`` = pad) and a
ChatML chat template, so the instruct template path (docs/concepts.md#the-rollout-format) runs exactly as for Qwen. The
ReSearch tags (``<think>``, ``<search>``, ...) are added as ordinary (non-special) tokens so that they
survive ``skip_special_tokens`` decoding like Qwen's multi-token tags do; nothing in the rollout relies on
them being single tokens (stop detection works on decoded text).

CLI (same config as training, so one source of defaults)::

    python -m research_rl.debug_model experiment=debug_cpu          # builds at model.path unless present
    python -m research_rl.debug_model experiment=debug_cpu --force
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from research_rl.config.schema import DebugModelConfig
from research_rl.data import iter_jsonl
from research_rl.algo.templates import SYSTEM_PROMPT, BASE_TEMPLATE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TAG_TOKENS = ["<think>", "</think>", "<search>", "</search>", "<result>", "</result>", "<answer>", "</answer>", "\\boxed{"]
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _training_text(corpus_path: str, question_files: list[str]) -> Iterator[str]:
    yield SYSTEM_PROMPT
    yield BASE_TEMPLATE
    for _, row in iter_jsonl(corpus_path):
        yield row["contents"]
    for path in question_files:
        for _, row in iter_jsonl(path):
            yield row["question"]
            yield " ".join(row.get("golden_answers", []))


def build_tokenizer(corpus_path: str, question_files: list[str], vocab_size: int):
    """Train a byte-level BPE tokenizer on the corpus (and question text) and wrap it for transformers.

    Returns a ``PreTrainedTokenizerFast`` with ChatML special tokens, EOS ``<|im_end|>``, pad ``<|endoftext|>``
    and a ChatML chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TAG_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(corpus_path, question_files), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.add_tokens(TAG_TOKENS)  # ordinary tokens: kept by skip_special_tokens decoding
    fast.chat_template = CHATML_TEMPLATE
    fast.model_max_length = 1 << 20
    return fast


def build_model(tokenizer, shape: DebugModelConfig):
    """A randomly initialised ``Qwen2ForCausalLM`` (float32) of the given shape, sized to the tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    torch.manual_seed(shape.seed)
    return Qwen2ForCausalLM(config)


def build_debug_model(out_dir: str, corpus_path: str, question_files: list[str], shape: DebugModelConfig,
                      force: bool = False) -> bool:
    """Build tokenizer + model into ``out_dir`` (HF format) atomically. Returns False if it already existed."""
    out = Path(out_dir)
    if (out / "config.json").exists() and not force:
        return False
    t0 = time.time()
    tokenizer = build_tokenizer(corpus_path, question_files, shape.vocab_size)
    model = build_model(tokenizer, shape)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        tokenizer.save_pretrained(tmp)
        model.generation_config.do_sample = True
        # as Qwen2.5-Instruct's generation config: both <|im_end|> and <|endoftext|> end a response
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
        model.save_pretrained(tmp)
        (tmp / "debug_model.json").write_text(json.dumps({
            "corpus_path": corpus_path, "shape": shape.__dict__, "build_seconds": round(time.time() - t0, 2),
            "num_parameters": sum(p.numel() for p in model.parameters()),
        }, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return True


def main() -> None:
    from research_rl.config.compose import compose_from_argv

    cfg, flags = compose_from_argv(flags={"--force"})
    built = build_debug_model(cfg.model.path, cfg.data.corpus_path, cfg.data.train_files, cfg.model.debug,
                              force="--force" in flags)
    info = json.loads((Path(cfg.model.path) / "debug_model.json").read_text())
    state = "built" if built else "already present (pass --force to rebuild)"
    print(f"debug model {state}: {cfg.model.path} ({info['num_parameters'] / 1e6:.2f}M parameters)")


if __name__ == "__main__":
    main()

"""Full weights as a stream: tensors cut into size-bounded buckets, tied aliases, persistent buffers, and a Hugging
Face model directory written from the stream one safetensors shard at a time (the learner's weight sync and HF
export, and ``python -m research_rl.export``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch


def persistent_buffers(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for prefix, m in module.named_modules():
        for name, b in m._buffers.items():
            if b is not None and name not in m._non_persistent_buffers_set:
                yield f"{prefix}.{name}" if prefix else name, b


def tied_aliases(module: torch.nn.Module) -> set[str]:
    """Parameter names that alias an earlier parameter (tied embeddings): streamed once, under the first name."""
    all_names = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    return all_names - {n for n, _ in module.named_parameters()}


def cut_buckets(named_tensors, bucket_mb: float):
    """Group a stream of ``(name, tensor)`` into dicts of at most ``bucket_mb`` MiB as it arrives (a tensor larger
    than that gets a bucket of its own); ``None`` tensors (ranks that hold no copy) are skipped."""
    limit = bucket_mb * 2**20
    current, size = {}, 0
    for name, tensor in named_tensors:
        if tensor is None:
            continue
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > limit:
            yield current
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    if current:
        yield current


def write_hf_model(path: str | Path, buckets, config, generation_config=None, tokenizer=None) -> Path:
    """Write a Hugging Face model directory from an iterable of ``{name: CPU tensor}`` buckets, one safetensors
    shard per bucket as it arrives (never the whole model in memory at once), plus ``config.json``, the generation
    config and the tokenizer when given. One bucket → ``model.safetensors``; more → ``model-0000i-of-0000n`` shards
    and ``model.safetensors.index.json``, as ``save_pretrained`` writes them. Returns ``path``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    parts, weight_map, total = [], {}, 0
    for i, bucket in enumerate(buckets):
        part = path / f".part-{i:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in bucket.items()}, str(part), metadata={"format": "pt"})
        parts.append((part, list(bucket)))
        total += sum(v.numel() * v.element_size() for v in bucket.values())
    if len(parts) == 1:
        parts[0][0].rename(path / "model.safetensors")
    for i, (part, names) in enumerate(parts if len(parts) > 1 else []):
        name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        part.rename(path / name)
        weight_map.update(dict.fromkeys(names, name))
    if weight_map:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(str(path))
    if generation_config is not None:
        generation_config.save_pretrained(str(path))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path

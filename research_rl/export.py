"""``python -m research_rl.export CKPT OUT [--dtype bfloat16]``: a Hugging Face model directory from a checkpoint's
sharded learner state, for either backend, on CPU (no GPU and no process group needed).

``CKPT`` is a checkpoint directory (``RUN_DIR/checkpoints/step_000010``, ``checkpoints/best``) or its ``sharded/``
directory. FSDP2 state is read with ``torch.distributed.checkpoint`` (no process group: DCP loads in one process);
DeepSpeed ZeRO-2/3 state is consolidated with DeepSpeed's own ``zero_to_fp32`` (the fp32 master weights). Either
way tensors are read and written one shard of ``--shard-mb`` MiB at a time, so a model never sits in memory whole.
``OUT`` gets the safetensors weights, ``config.json``, the generation config and the tokenizer; it loads with
``AutoModelForCausalLM.from_pretrained(OUT)`` and gives the training-time logits.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Iterator

import torch

from research_rl.driver.checkpoint import SHARDED
from research_rl.learner.weights import cut_buckets, tied_aliases, write_hf_model
from research_rl.learner.core import BACKEND_FILE, HF_CONFIG_DIR


def sharded_dir(ckpt: str | Path) -> Path:
    """The ``sharded/`` directory of ``ckpt`` (a checkpoint or that directory itself).

    Raises:
        FileNotFoundError: neither holds ``learner.json``.
    """
    ckpt = Path(ckpt)
    for candidate in (ckpt / SHARDED, ckpt):
        if (candidate / BACKEND_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"{ckpt} is not a research-rl checkpoint: no {SHARDED}/{BACKEND_FILE} in it")


def _dcp_tensors(path: Path, bucket_mb: float) -> Iterator[tuple[str, torch.Tensor]]:
    """The model tensors of an FSDP2 DCP checkpoint, loaded a bucket at a time."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    metas = {key.removeprefix("model."): m for key, m in reader.read_metadata().state_dict_metadata.items()
             if key.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    empties = ((name, torch.empty(m.size, dtype=m.properties.dtype)) for name, m in metas.items())
    for bucket in cut_buckets(empties, bucket_mb):
        dcp.load({"model": bucket}, checkpoint_id=str(path))  # fills the tensors in place; no process group
        yield from bucket.items()


def _zero_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The fp32 master weights of a DeepSpeed ZeRO checkpoint, one tensor at a time (``lazy_mode``)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from research_rl.learner.deepspeed_backend import TAG

    state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=TAG, lazy_mode=True)
    for name in list(state):
        yield name, state.pop(name).contiguous()


def export(ckpt: str | Path, out: str | Path, dtype: torch.dtype = torch.float32, shard_mb: float = 4096) -> Path:
    """Write the policy in ``ckpt`` as a Hugging Face model directory ``out``. Returns ``out``.

    Raises:
        FileNotFoundError: ``ckpt`` is not a checkpoint.
        ValueError: the sharded state lacks some of the model's parameters, or names an unknown backend.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    sharded = sharded_dir(ckpt)
    info = json.loads((sharded / BACKEND_FILE).read_text())
    hf = sharded / HF_CONFIG_DIR
    config = AutoConfig.from_pretrained(hf)
    with torch.device("meta"):  # names only, no memory
        skeleton = AutoModelForCausalLM.from_config(config)
    aliases = tied_aliases(skeleton)
    expected = set(skeleton.state_dict()) - aliases
    if info["backend"] == "fsdp2":
        tensors = _dcp_tensors(sharded / "dcp", shard_mb)
    elif info["backend"] == "deepspeed":
        tensors = _zero_tensors(sharded)
    else:
        raise ValueError(f"{sharded / BACKEND_FILE}: unknown backend {info['backend']!r}")

    written: set[str] = set()

    def wanted() -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in tensors:
            if name in expected:
                written.add(name)
                yield name, t.to(dtype)

    generation = GenerationConfig.from_pretrained(hf) if (hf / "generation_config.json").is_file() else None
    tokenizer = AutoTokenizer.from_pretrained(hf) if (hf / "tokenizer_config.json").is_file() else None
    config.dtype = dtype
    out = Path(out)
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_hf_model(tmp, cut_buckets(wanted(), shard_mb), config, generation, tokenizer)
    missing = expected - written
    if missing:
        shutil.rmtree(tmp)
        raise ValueError(f"{sharded} lacks {len(missing)} of the model's tensors, e.g. {sorted(missing)[:3]}")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m research_rl.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="RUN_DIR/checkpoints/step_NNNNNN (or its sharded/ directory)")
    p.add_argument("out", help="the Hugging Face model directory to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--shard-mb", type=float, default=4096, help="MiB per safetensors shard (default 4096)")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, getattr(torch, args.dtype), args.shard_mb)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"export: {e}")
    print(f"wrote {out} (load with AutoModelForCausalLM.from_pretrained({str(out)!r}))")


if __name__ == "__main__":
    main()

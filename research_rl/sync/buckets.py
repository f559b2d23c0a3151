"""The layout of one weight sync: tensors in the engine's dtype, packed into size-bounded flat byte buckets.

A sync is planned before any byte moves: learner rank 0 lists every tensor the engines must receive (Hugging Face
names, global shapes, tied aliases once) and cuts the list into ``Bucket`` layouts of at most ``bucket_mb`` MiB,
with each tensor at a byte offset of its bucket (aligned to ``ALIGN`` = 16 bytes, so every tensor view of the flat
buffer is aligned for its dtype). The plan travels to the engines first (they check the names against their model before
anything is loaded), then each bucket's bytes travel once: as one flat ``uint8`` buffer, whatever the transport
(``research_rl.sync.transport``). A tensor larger than ``bucket_mb`` gets a bucket of its own.

The wire dtype is the engine's (bf16 on GPU): the engine rounds to its own dtype when it loads, so sending the
learner's fp32 master weights would double the bytes and buy nothing (verl and OpenRLHF send bf16 too).

Imports torch and the standard library only (the GPU check runs it on a machine with nothing else).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import torch

# bytes: the alignment of every tensor in a bucket (enough for any dtype's view and for 16-byte vectorised copies);
# a tensor whose size is a multiple of 16 bytes (every bf16 weight of a model whose dimensions are multiples of 8)
# leaves no padding, so the bytes on the wire are the parameters × the dtype's size
ALIGN = 16


def dtype_of(name: str) -> torch.dtype:
    """``"bfloat16"`` → ``torch.bfloat16`` (a ``model.dtype`` value, or ``str(torch.dtype)``).

    Raises:
        ValueError: not a floating-point torch dtype.
    """
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{name!r} is not a floating-point torch dtype")
    return dtype


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a sync: Hugging Face name, global shape, wire dtype name, byte offset in its bucket."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_of(self.dtype).itemsize


@dataclass(frozen=True)
class Bucket:
    """One bucket's layout: its index in the sync, its tensors (with offsets) and its size in bytes."""

    index: int
    specs: tuple[TensorSpec, ...]
    nbytes: int

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.specs)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def plan_buckets(tensors: Iterable[tuple[str, Sequence[int]]], dtype: str, bucket_mb: float) -> list[Bucket]:
    """Cut ``(name, shape)`` pairs, in the order the learner will gather them, into buckets of at most
    ``bucket_mb`` MiB of ``dtype`` (a larger tensor gets a bucket of its own).

    Raises:
        ValueError: a name twice, ``bucket_mb`` not positive, or ``dtype`` not a floating-point dtype.
    """
    if bucket_mb <= 0:
        raise ValueError(f"bucket size must be positive, got {bucket_mb} MiB")
    itemsize = dtype_of(dtype).itemsize
    limit = int(bucket_mb * 2**20)
    buckets: list[Bucket] = []
    specs: list[TensorSpec] = []
    size, seen = 0, set()

    def close() -> None:
        nonlocal specs, size
        if specs:
            buckets.append(Bucket(len(buckets), tuple(specs), size))
        specs, size = [], 0

    for name, shape in tensors:
        if name in seen:
            raise ValueError(f"weight sync plan: {name!r} appears twice")
        seen.add(name)
        spec = TensorSpec(name, tuple(int(d) for d in shape), str(dtype).removeprefix("torch."))
        nbytes = spec.numel * itemsize
        if specs and _aligned(size) + nbytes > limit:
            close()
        offset = _aligned(size)
        specs.append(TensorSpec(spec.name, spec.shape, spec.dtype, offset))
        size = offset + nbytes
    close()
    return buckets


def largest(buckets: Sequence[Bucket]) -> int:
    """Bytes of the largest bucket: the size of a buffer that holds any of them."""
    return max((b.nbytes for b in buckets), default=0)


def pack(bucket: Bucket, tensors: Mapping[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Copy ``bucket``'s tensors, cast to the wire dtype, into the flat ``uint8`` buffer ``out`` (on any device:
    the copy runs there; no host copy for a device buffer). Returns ``out[:bucket.nbytes]``.

    Raises:
        KeyError: a tensor of the layout missing from ``tensors``.
        ValueError: a shape that differs from the layout's, or ``out`` smaller than the bucket.
    """
    if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < bucket.nbytes:
        raise ValueError(f"pack: need a flat uint8 buffer of >= {bucket.nbytes} bytes, got {out.dtype} "
                         f"{tuple(out.shape)}")
    for view, spec in zip(_views(out, bucket), bucket.specs):
        t = tensors[spec.name]
        if tuple(t.shape) != spec.shape:
            raise ValueError(f"pack: {spec.name} has shape {tuple(t.shape)}, the sync plan says {spec.shape}")
        view.copy_(t.detach().reshape(spec.shape))  # casts to the wire dtype, on out's device
    return out[:bucket.nbytes]


def unpack(bucket: Bucket, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` views of a flat ``uint8`` buffer holding ``bucket`` (no copy; valid as long as the buffer
    is). Raises ``ValueError`` for a buffer smaller than the bucket."""
    if flat.numel() < bucket.nbytes:
        raise ValueError(f"unpack: bucket {bucket.index} needs {bucket.nbytes} bytes, the buffer has {flat.numel()}")
    return [(spec.name, view) for spec, view in zip(bucket.specs, _views(flat, bucket))]


def _views(flat: torch.Tensor, bucket: Bucket) -> Iterator[torch.Tensor]:
    for spec in bucket.specs:
        raw = flat[spec.offset:spec.offset + spec.nbytes]
        yield raw.view(dtype_of(spec.dtype)).view(spec.shape)

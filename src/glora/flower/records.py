"""LoRA factors, heads and base offsets in and out of Flower ArrayRecords, with the checks a
server applies to what a node sends back.

One ArrayRecord per message, keys prefixed by what they hold: ``B.<layer>`` (d_out, r),
``A.<layer>`` (r, d_in), ``head.<name>`` and ``base.<layer>`` (d_out, d_in: what merging
rules have added to the frozen base weights so far).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord
from torch import Tensor

from glora.lowrank import LowRank


def encode(
    factors: Mapping[str, LowRank] | None = None,
    head: Mapping[str, Tensor] | None = None,
    base: Mapping[str, Tensor] | None = None,
) -> ArrayRecord:
    """Factors, head and base offsets as one ArrayRecord (the scale is not sent: it follows
    from the rank and the run's LoRA settings)."""
    out: dict[str, Tensor] = {}
    for n, f in (factors or {}).items():
        out[f"B.{n}"] = f.B.detach()
        out[f"A.{n}"] = f.A.detach()
    for n, t in (head or {}).items():
        out[f"head.{n}"] = t.detach()
    for n, t in (base or {}).items():
        out[f"base.{n}"] = t.detach()
    return ArrayRecord(out)


def record_bytes(record: ArrayRecord) -> int:
    """The bytes of the arrays a message carries: what the transport counts for traffic."""
    return sum(record[k].numpy().nbytes for k in record)


def _tensors(record: ArrayRecord, prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: torch.from_numpy(record[k].numpy().copy()) for k in record if k.startswith(prefix)}


def decode_head(record: ArrayRecord) -> dict[str, Tensor]:
    return _tensors(record, "head.")


def decode_base(record: ArrayRecord) -> dict[str, Tensor] | None:
    """The base offsets, or None where the record has none (nothing merged yet)."""
    return _tensors(record, "base.") or None


def decode_factors(record: ArrayRecord, scale: float) -> dict[str, LowRank]:
    """Every layer's (B, A) in the record as LowRank with ``scale``; ValueError for a layer
    with only one of its two factors or factors that do not multiply."""
    B, A = _tensors(record, "B."), _tensors(record, "A.")
    if set(B) != set(A):
        raise ValueError(f"layers {sorted(set(B) ^ set(A))} have only one of the factors B and A")
    out = {}
    for n in sorted(B):
        if B[n].ndim != 2 or A[n].ndim != 2 or B[n].shape[1] != A[n].shape[0]:
            raise ValueError(
                f"layer {n}: B {tuple(B[n].shape)} and A {tuple(A[n].shape)} are not (d_out, r), (r, d_in)"
            )
        out[n] = LowRank(B[n], A[n], scale)
    return out


def sent_rank(record: ArrayRecord) -> int:
    """The rank of the factors a record carries (the columns of its first B); ValueError for
    a record without factors."""
    for k in record:
        if k.startswith("B."):
            shape = record[k].numpy().shape
            if len(shape) != 2:
                raise ValueError(f"{k} has shape {shape}, not (d_out, r)")
            return int(shape[1])
    raise ValueError("the reply holds no factors (no B.<layer> array)")


def check_update(
    record: ArrayRecord,
    rank: int,
    scale: float,
    shapes: Mapping[str, tuple[int, int]],
    head: Mapping[str, Tensor],
) -> tuple[dict[str, LowRank], dict[str, Tensor]]:
    """A node's trained factors and head, checked against what the server sent: every layer
    of ``shapes`` at ``rank``, the head's keys and shapes, all finite. ValueError saying what
    is wrong, so the server can leave the node out of the round with that reason."""
    factors = decode_factors(record, scale)
    if set(factors) != set(shapes):
        missing, extra = sorted(set(shapes) - set(factors)), sorted(set(factors) - set(shapes))
        raise ValueError(f"factors for the wrong layers (missing {missing[:3]}, unexpected {extra[:3]})")
    for n, f in factors.items():
        want_B, want_A = (shapes[n][0], rank), (rank, shapes[n][1])
        if tuple(f.B.shape) != want_B or tuple(f.A.shape) != want_A:
            raise ValueError(
                f"layer {n}: factors of shapes B {tuple(f.B.shape)}, A {tuple(f.A.shape)}; "
                f"the rank-{rank} adapter sent has B {want_B}, A {want_A}"
            )
        if not bool(torch.isfinite(f.B).all() and torch.isfinite(f.A).all()):
            raise ValueError(f"layer {n}: factors contain NaN or Inf")
    got_head = decode_head(record)
    if set(got_head) != set(head):
        raise ValueError(f"head parameters {sorted(got_head)} differ from the server's {sorted(head)}")
    for n, t in got_head.items():
        if t.shape != head[n].shape:
            raise ValueError(f"head parameter {n}: shape {tuple(t.shape)}, expected {tuple(head[n].shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"head parameter {n} contains NaN or Inf")
    return factors, got_head

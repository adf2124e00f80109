"""Fixed-shape batches: how the model stages batch across pieces without changing any piece's numbers.

Measured on CPU (torch 2.13, the tiny models of every batched stage, docs/benchmarks.md): a row's output depends
on the *shape* of the forward pass it ran in, not on the other rows. The same window run in a batch of 1, 2 and 8
gives three different float32 results (BLAS and oneDNN pick other kernels and blockings for another batch size;
the last bits differ, about 1e-7 relative), while the same window in any two batches of 8 gives the same bits
whatever its batch-mates are. So a stage whose every forward pass has exactly ``batch_size`` rows (a short batch
filled with copies of its last item, whose outputs are dropped) gives each item the same bits whether it ran
alone, with its own clip's items, or with a whole partition's: a resumed or re-partitioned run stays identical.
Items of different shapes (token counts, window lengths) never share a batch, since padding changes the shape.

The price is the filler rows: a piece computed alone pays for ``batch_size`` rows per shape it has; batched
across a partition, only each shape's last batch is filled.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

Item = TypeVar("Item")
Output = TypeVar("Output")


def fixed_shape_batches(shapes: Sequence[Hashable], batch_size: int) -> list[tuple[list[int], list[int]]]:
    """Plan batches for items with the given shapes: ``(real item indices, row indices)`` per batch, where the
    rows are the real items followed by copies of the last one up to exactly ``batch_size`` rows. Items of one
    shape keep their order; shapes come in order of first appearance."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    groups: dict[Hashable, list[int]] = {}
    for index, shape in enumerate(shapes):
        groups.setdefault(shape, []).append(index)
    plan = []
    for indices in groups.values():
        for first in range(0, len(indices), batch_size):
            real = indices[first:first + batch_size]
            plan.append((real, real + [real[-1]] * (batch_size - len(real))))
    return plan


def run_fixed_shape_batches(items: Sequence[Item], shapes: Sequence[Hashable], batch_size: int,
                            forward: Callable[[list[Item]], Sequence[Output]]) -> list[Output]:
    """``forward`` over ``items`` in batches of exactly ``batch_size`` rows of one shape (see the module
    docstring); ``forward(rows)`` returns one output per row. Returns one output per item, in order."""
    outputs: list = [None] * len(items)
    for real, rows in fixed_shape_batches(shapes, batch_size):
        results = forward([items[index] for index in rows])
        for index, result in zip(real, results, strict=False):  # the filler rows' outputs are dropped
            outputs[index] = result
    return outputs

"""The sample order: a pure function of (seed, epoch, n, world), shuffled shard-aware, disjoint per rank.

Resuming needs only ``(epoch, batch_in_epoch)``: the order of any epoch can be recomputed from scratch, so a
resumed run reads exactly the images an uninterrupted run would have read, in the same order, and in the same
augmentation view (``view_of``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def permutation(
    seed: int, epoch: int, n: int, world: int, *, shard_of: np.ndarray | None = None
) -> np.ndarray:
    """The epoch's order of ``n`` samples as a ``(world, n // world)`` int64 array; row ``r`` is rank r's
    share.

    Shard-aware: the shards are visited in a shuffled order and the samples inside each shard are shuffled, so
    consecutive reads stay inside one shard (one Zarr shard file) instead of jumping across the whole store.
    The samples are then dealt round-robin to ranks, so the ranks read disjoint samples and finish together;
    the last ``n % world`` samples of the epoch are dropped (a different few every epoch).

    Args:
        seed: run seed.
        epoch: epoch number; every epoch has its own order.
        n: number of samples (positions ``0..n-1``).
        world: number of processes.
        shard_of: ``(n,)`` shard id of each position; ``None`` treats every sample as its own shard.
    """
    if n < world:
        raise ValueError(f"{n} samples cannot be split over {world} processes")
    rng = np.random.default_rng([seed, epoch])
    if shard_of is None:
        order = rng.permutation(n)
    else:
        shard_of = np.asarray(shard_of)
        shards = np.unique(shard_of)
        order = np.concatenate(
            [rng.permutation(np.flatnonzero(shard_of == s)) for s in rng.permutation(shards)]
        )
    per_rank = n // world
    return order[: per_rank * world].reshape(per_rank, world).T.astype(np.int64)


def batches(
    seed: int, epoch: int, n: int, world: int, rank: int, batch: int, *, shard_of=None
) -> list[np.ndarray]:
    """Rank ``rank``'s micro-batches of positions for one epoch; an incomplete last batch is dropped."""
    mine = permutation(seed, epoch, n, world, shard_of=shard_of)[rank]
    return [mine[i : i + batch] for i in range(0, len(mine) - batch + 1, batch)]


VIEW_STREAM = 0x56494557  # "VIEW": keeps the view draw independent of the object draw of the same image


def view_of(seed: int, epoch: int, image: int, n_views: int) -> int:
    """The view (an index into the cache's views) that ``image`` is read in during ``epoch``: uniform, and a
    pure function of ``(seed, epoch, image)``, so a resumed run reads every image in the same view."""
    if n_views == 1:
        return 0
    return int(np.random.default_rng([seed, epoch, image, VIEW_STREAM]).integers(n_views))


def micro_batches(
    images: np.ndarray,
    *,
    seed: int,
    world: int,
    rank: int,
    batch: int,
    shard_of: np.ndarray | None = None,
    epoch: int = 0,
    position: int = 0,
) -> Iterator[tuple[int, np.ndarray]]:
    """Rank ``rank``'s micro-batches over ``images``, forever, from micro-batch ``position`` of ``epoch`` on:
    ``(epoch, (batch,) images)``, each epoch's ``batches`` in turn. What the loader reads, and, being a
    pure function of its arguments, what a resume at ``(epoch, position)`` continues exactly.

    Args:
        images: ``(n,)`` the items to order (the training images' cache indices).
        shard_of: ``(n,)`` shard id of each item (``permutation``'s shard-aware order).
    """
    while True:
        for idx in batches(seed, epoch, len(images), world, rank, batch, shard_of=shard_of)[position:]:
            yield epoch, images[idx]
        epoch, position = epoch + 1, 0

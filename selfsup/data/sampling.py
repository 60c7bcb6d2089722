"""Resumable, rank-sharded sampling with per-sample augmentation seeds.

Exact resume needs the data of the steps after a restart to be the data an uninterrupted run would
have seen. Three choices make that hold regardless of workers, prefetching and ranks:

- the order of an epoch depends only on ``(seed, epoch)`` (a :class:`DistributedSampler` permutation);
- every sample carries its own augmentation seed, a function of ``(seed, epoch, index)``, so a view
  does not depend on which worker made it or how many samples that worker made before;
- the loader's state is the number of samples the *training loop* consumed, read from Lightning's
  progress counters, not the number the loader (or Lightning's prefetcher) has produced.
"""

from __future__ import annotations

import atexit
import signal
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler

from selfsup.distributed import rank, world_size


def sample_seed(base_seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch: independent of workers, ranks and resumes."""
    return (base_seed * 1_000_003 + epoch * 2_147_483_647 + index * 6_700_417) % (2**63 - 1)


def ignore_termination_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a worker ignores SIGTERM/SIGUSR1 so only the trainer reacts.

    Clusters signal every process of a job; a worker killed by it would crash the trainer before it
    could save. Workers still exit when the trainer shuts them down or dies.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class ResumableSampler(DistributedSampler):
    """This rank's share of a seeded permutation per epoch, as ``(index, augmentation seed)`` pairs.

    Lightning leaves a ``DistributedSampler`` in place under DDP and calls :meth:`set_epoch` each
    epoch. :meth:`resume` makes the next iteration start ``samples_done`` into an epoch.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, shuffle: bool = True):
        super().__init__(dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed,
                         drop_last=True)
        self._start = 0

    def resume(self, epoch: int, samples_done: int) -> None:
        """Start the next iteration at sample ``samples_done`` of ``epoch`` (a finished epoch rolls over)."""
        if samples_done >= self.num_samples:
            epoch, samples_done = epoch + 1, 0
        self.set_epoch(epoch)
        self._start = samples_done

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())
        start, self._start = self._start, 0
        return iter([(i, sample_seed(self.seed, self.epoch, i)) for i in indices[start:]])


class ResumableLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` that Lightning saves and restores mid-epoch.

    ``progress`` returns ``(epoch, batches the training loop has processed in it)``; the data module
    sets it, since only the trainer knows what was consumed (the loader itself runs ahead).
    """

    progress: Callable[[], tuple[int, int]] | None = None

    def _get_iterator(self):
        iterator = super()._get_iterator()
        if self.num_workers > 0:
            _track_workers(iterator)
        return iterator

    def state_dict(self) -> dict[str, Any]:
        if self.progress is None:
            return {}
        epoch, batches = self.progress()
        return {"epoch": epoch, "samples_done": batches * (self.batch_size or 1), "world_size": world_size()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state or not isinstance(self.sampler, ResumableSampler):
            return
        if state.get("world_size", world_size()) != world_size():
            # a different number of ranks shards differently: restart the interrupted epoch's data
            self.sampler.resume(state["epoch"], 0)
            return
        self.sampler.resume(state["epoch"], state["samples_done"])


# Training workers ignore SIGTERM (:func:`ignore_termination_in_worker`), so the SIGTERM that
# multiprocessing's exit handler sends to its children would not stop them, and a process that left a
# loader mid-epoch (a script, a notebook, an interrupted run) would hang at exit waiting for them. atexit
# runs handlers last-registered first, so this one, registered when the first workers start (after
# multiprocessing registered its own), shuts the workers down through the DataLoader's own protocol
# before multiprocessing's handler joins them. Nothing is registered at import.
_WORKER_ITERATORS: weakref.WeakSet = weakref.WeakSet()
_registered = False


def _track_workers(iterator: Any) -> None:
    global _registered
    if not _registered:
        atexit.register(_shutdown_workers_at_exit)
        _registered = True
    _WORKER_ITERATORS.add(iterator)


def _shutdown_workers_at_exit() -> None:
    for iterator in list(_WORKER_ITERATORS):
        iterator._shutdown_workers()

"""Run by tests/test_resume_fresh.py, once to save and once to resume, each in a process of its own:

    python resume_job.py save SPEC OUT      # the uninterrupted runs: states at the save points, and what followed
    python resume_job.py resume SPEC OUT    # fresh loaders load those states: what follows them

SPEC (JSON) names the sampler, the dataset and the scenarios: (num_workers saving, num_workers resuming, where
the state is taken, whether the resuming process restores torch's global RNG saved beside the loader's state).
Every run does what a training loop does: after each batch it draws from torch's global RNG (its own
randomness), and those draws are recorded with the batches. OUT/<scenario>.pt holds them, written with
torch.save; the save run also writes OUT/<scenario>.json, the loader's state as JSON.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, Dataset, RandomSampler, TensorDataset

import stoker
from helpers import YieldCounting  # tests/ is on PYTHONPATH (test_resume_fresh sets it)

N, BS = 23, 4  # 6 batches an epoch, the last one short
FIRST_EPOCH = 1  # every state is taken in the second epoch (or after it), the RNGs well on their way
EPOCHS_AFTER = 2  # the resumed process goes on for this many iterators (the rest of the epoch, the next)


class Samples(Dataset):
    """A Python dataset: sample i is tensor([i, -i])."""

    def __len__(self):
        return N

    def __getitem__(self, i):
        return torch.tensor([i, -i])


class Counting(Dataset):
    """A stateful map-style dataset (torchdata's Stateful protocol) counting the samples its object served:
    sample i is tensor([i, samples served by this object so far, its worker id]); worker processes each
    count in their own copy."""

    def __init__(self):
        self.count = 0

    def __len__(self):
        return N

    def __getitem__(self, i):
        self.count += 1
        info = torch.utils.data.get_worker_info()
        return torch.tensor([i, self.count, -1 if info is None else info.id])

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


class StatefulShuffle(YieldCounting):
    """A sampler with its own state, as torchdata's StatefulDistributedSampler: epoch e (``set_epoch``) is a
    permutation from (seed, e); resumed from its own state (see YieldCounting), never replayed."""

    def __init__(self, n, seed):
        super().__init__()
        self.n, self.seed = n, seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def order(self) -> list:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()


def _generator(seed):
    return torch.Generator().manual_seed(seed)


SAMPLERS = {
    # name: loader arguments over a dataset
    "RandomSampler": lambda ds: {"sampler": RandomSampler(ds), "batch_size": BS},
    "RandomSampler_generator": lambda ds: {"sampler": RandomSampler(ds, generator=_generator(7)), "batch_size": BS},
    "BatchSampler_RandomSampler": lambda ds: {
        "batch_sampler": BatchSampler(RandomSampler(ds), BS, drop_last=False)},
    "BatchSampler_RandomSampler_generator": lambda ds: {
        "batch_sampler": BatchSampler(RandomSampler(ds, generator=_generator(8)), BS, drop_last=True)},
    "loader_generator": lambda ds: {"sampler": RandomSampler(ds), "batch_size": BS, "generator": _generator(3)},
    "stateful": lambda ds: {"sampler": StatefulShuffle(N, seed=5), "batch_size": BS},
    "shuffle": lambda ds: {"shuffle": True, "batch_size": BS},  # stoker's own sampler, for the counting dataset
}

DATASETS = {
    "python": Samples,
    "tensor": lambda: TensorDataset(torch.arange(N), -torch.arange(N)),
    "counting": Counting,
}


def build(spec, num_workers):
    dataset = DATASETS[spec["dataset"]]()
    return stoker.DataLoader(dataset, num_workers=num_workers, persistent_workers=spec.get("persistent", False)
                             and num_workers > 0, **SAMPLERS[spec["sampler"]](dataset))


def sampler_generator(loader):
    """The generator of the sampler a loader was given (or of the one its batch_sampler wraps), else None."""
    sampler = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    for layer in (sampler, getattr(sampler, "sampler", None)):
        generator = getattr(layer, "generator", None)
        if isinstance(generator, torch.Generator):
            return generator
    return None


def stateful_sampler(loader):
    return loader.sampler if isinstance(loader.sampler, StatefulShuffle) else None


def consume(batches, record):
    """Takes batches as a training loop does: each is recorded with the loop's own draw from the global RNG."""
    for batch in batches:
        record.append((batch, torch.rand(2)))


def begin_epoch(loader, epoch):
    """What the loop does before epoch ``epoch``: a sampler with epochs of its own is told which."""
    sampler = stateful_sampler(loader)
    if sampler is not None:
        sampler.set_epoch(epoch)


def epoch_of(loader, epoch):
    begin_epoch(loader, epoch)
    out = []
    consume(loader, out)
    return out


def finals(loader):
    """What the run leaves behind: torch's global RNG, the sampler's and the loader's generators."""
    gen = sampler_generator(loader)
    return {"global": torch.get_rng_state(), "sampler_generator": None if gen is None else gen.get_state(),
            "loader_generator": None if loader.generator is None else loader.generator.get_state()}


def save(spec, out: Path):
    for scenario in spec["scenarios"]:
        name, workers, point = scenario["name"], scenario["workers"][0], scenario["point"]
        torch.manual_seed(1234)
        loader = build(spec, workers)
        for epoch in range(FIRST_EPOCH):
            epoch_of(loader, epoch)
        begin_epoch(loader, FIRST_EPOCH)
        it = iter(loader)
        head = []
        if point == "stopped":  # the epoch's iterator has ended: the state stands at the next epoch
            consume(it, head)
        else:
            consume(itertools.islice(it, min(point, len(loader))), head)
        state = loader.state_dict()
        rng = torch.get_rng_state()
        after = []
        if point != "stopped":
            consume(it, after)  # the rest of the epoch
            after = [after]
        while len(after) < EPOCHS_AFTER:
            after.append(epoch_of(loader, FIRST_EPOCH + len(after) + (point == "stopped")))
        (out / f"{name}.json").write_text(json.dumps(state))
        torch.save({"head": head, "after": after, "rng": rng, "finals": finals(loader)}, out / f"{name}.pt")


def resume(spec, out: Path, states: Path):
    for scenario in spec["scenarios"]:
        name, workers = scenario["name"], scenario["workers"][1]
        saved = torch.load(states / f"{name}.pt", weights_only=False)
        state = json.loads((states / f"{name}.json").read_text())
        torch.manual_seed(98765)  # this process's global RNG is elsewhere
        loader = build(spec, workers)
        if scenario["restore_rng"]:
            torch.set_rng_state(saved["rng"])  # the user's checkpoint of torch's RNG, taken beside the loader's
        loader.load_state_dict(state)
        reported = loader.state_dict()
        after = [epoch_of(loader, state["epoch"] + i) for i in range(EPOCHS_AFTER)]
        sampler = stateful_sampler(loader)
        torch.save({"after": after, "finals": finals(loader), "reported": reported,
                    "produced": None if sampler is None else sampler.produced}, out / f"{name}.pt")


if __name__ == "__main__":
    mode, spec, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    if mode == "save":
        save(spec, out)
    else:
        resume(spec, out, Path(sys.argv[4]))

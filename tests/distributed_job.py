"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2`: each rank loads its shard with
stoker.DataLoader and stoker.PackedLoader (sharded by torch.distributed), saves and resumes mid-epoch, and
writes what it saw to OUT/rank<r>.json for the test to compare."""

import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data import DistributedSampler

import stoker

N = 103
BATCH = 8
PACK_DOCS, PACK_LEN = 200, 32  # PackedLoader: documents of 0..95 tokens in rows of 32


class Squares(torch.utils.data.Dataset):
    """A Python dataset: sample i is {"i": i, "x": [i, i*i]}."""

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"i": i, "x": torch.tensor([i, i * i])}


def indices(batch):
    return [int(i) for i in (batch["i"] if isinstance(batch, dict) else batch).reshape(-1)]


def run(kind, num_workers):
    dataset = np.arange(N) if kind == "array" else Squares()

    def make(workers=num_workers):
        return stoker.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers)

    loader = make()
    epochs = [[indices(b) for b in loader] for _ in range(2)]
    first = make()
    it = iter(first)
    head = [indices(next(it)) for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))
    del it
    resumed = make(workers=2 - num_workers)  # another thread count: the position does not depend on it
    resumed.load_state_dict(state)
    tail = [indices(b) for b in resumed]
    after = [indices(b) for b in resumed]
    return {"len": len(loader), "epochs": epochs, "head": head, "tail": tail, "after": after, "state": state}


def user_sampler():
    """A DistributedSampler the user passes is followed as torch follows it."""
    dataset = Squares()
    out = []
    for cls in (stoker.DataLoader, TorchDataLoader):
        sampler = DistributedSampler(dataset, shuffle=True, seed=3)
        sampler.set_epoch(1)
        out.append([indices(b) for b in cls(dataset, batch_size=BATCH, sampler=sampler)])
    return out


def whole():
    """world_size=1 under the process group: every rank serves the whole dataset (DataLoader, PackedLoader)."""
    plain = [indices(b) for b in stoker.DataLoader(np.arange(N), batch_size=BATCH, world_size=1)]
    docs = packed_documents()
    packed = [packed_tokens(b) for b in stoker.PackedLoader(docs, PACK_LEN, BATCH, world_size=1,
                                                            return_doc_ids=True, shuffle=False)]
    return {"plain": plain, "packed": packed}


def packed_tokens(batch):
    """The real tokens of a packed batch (doc_ids >= 0), flattened."""
    return [int(t) for t in batch["input_ids"][batch["doc_ids"] >= 0]]


def packed_documents():
    """PACK_DOCS documents of 0..3*PACK_LEN-1 tokens whose tokens are their positions in the flat array."""
    lengths = np.random.default_rng(0).integers(0, 3 * PACK_LEN, PACK_DOCS)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return stoker.TokenDataset.from_flat(np.arange(offsets[-1], dtype=np.int32), offsets)


def packed():
    """stoker.PackedLoader sharded by torch.distributed: the ranks step together (an all_reduce per batch, which
    would hang were their batch counts to differ), each serving the tokens of its own documents; then a
    mid-epoch save/resume."""
    docs = packed_documents()

    def make():
        return stoker.PackedLoader(docs, PACK_LEN, BATCH, window=16, return_doc_ids=True)

    loader = make()
    lengths_seen, epochs, totals = [], [], []
    for _ in range(2):
        lengths_seen.append(len(loader))
        tokens, total = [], torch.zeros((), dtype=torch.int64)
        for batch in loader:
            served = torch.tensor(int((batch["doc_ids"] >= 0).sum()))
            dist.all_reduce(served)  # every rank must take part in every step
            total += served
            tokens.append(packed_tokens(batch))
        epochs.append(tokens)
        totals.append(int(total))
    first = make()
    it = iter(first)
    head = [packed_tokens(next(it)) for _ in range(2)]
    state = json.loads(json.dumps(first.state_dict()))
    del it
    resumed = make()
    resumed.load_state_dict(state)
    tail = [packed_tokens(b) for b in resumed]
    return {"len": lengths_seen, "epochs": epochs, "totals": totals, "num_tokens": docs.num_tokens,
            "head": head, "tail": tail, "state": state, "stats": loader.stats()}


def main(out_dir):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "array": run("array", 0),
        "python": run("python", 2),
        "user_sampler": user_sampler(),
        "packed": packed(),
        "whole": whole(),
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

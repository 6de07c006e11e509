"""Two real processes under torchrun (gloo, CPU): each rank loads its own shard of the same dataset, the shards
cover the dataset without overlap beyond DistributedSampler's padding (for PackedLoader: every token once, the
ranks in step), and a mid-epoch save/resume on both ranks continues exactly. The job itself is
tests/distributed_job.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import stoker

JOB = Path(__file__).with_name("distributed_job.py")
N, BATCH, WORLD = 103, 8, 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(JOB), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["rank"] for r in results] == list(range(WORLD))
    assert all(r["world_size"] == WORLD for r in results)
    return results


def _flat(batches):
    return [i for b in batches for i in b]


@pytest.mark.parametrize("kind", ["array", "python"])
def test_shards_cover_the_dataset_and_are_disjoint(ranks, kind):
    per_rank = -(-N // WORLD)  # DistributedSampler pads to a multiple of the world size
    for epoch in range(2):
        shards = [_flat(r[kind]["epochs"][epoch]) for r in ranks]
        assert all(len(s) == per_rank for s in shards)
        assert set().union(*shards) == set(range(N))
        overlap = set(shards[0]) & set(shards[1])
        assert len(overlap) <= per_rank * WORLD - N  # only the padding repeats a sample
        assert all(len(r[kind]["epochs"][epoch]) == r[kind]["len"] for r in ranks)
    for r in ranks:
        assert r[kind]["epochs"][0] != r[kind]["epochs"][1]  # reshuffled per epoch


@pytest.mark.parametrize("kind", ["array", "python"])
def test_each_rank_serves_what_rank_and_world_size_name(ranks, kind):
    # the shard under torch.distributed is the one rank=/world_size= give without it (seed 0 on every rank)
    for rank, result in enumerate(ranks):
        loader = stoker.DataLoader(np.arange(N), batch_size=BATCH, shuffle=True, rank=rank, world_size=WORLD)
        expected = [[[int(i) for i in b] for b in loader] for _ in range(2)]
        assert result[kind]["epochs"] == expected


@pytest.mark.parametrize("kind", ["array", "python"])
def test_resume_on_every_rank_continues_exactly(ranks, kind):
    for rank, result in enumerate(ranks):
        r = result[kind]
        assert r["state"]["rank"] == rank and r["state"]["world_size"] == WORLD
        assert r["state"]["batches_served"] == 3
        assert r["head"] + r["tail"] == r["epochs"][0]
        assert r["after"] == r["epochs"][1]


def test_user_distributed_sampler_is_followed(ranks):
    shards = []
    for result in ranks:
        ours, torchs = result["user_sampler"]
        assert ours == torchs
        shards.append(_flat(ours))
    assert set().union(*shards) == set(range(N))


def test_packed_ranks_serve_every_token_once_in_step(ranks):
    packed = [r["packed"] for r in ranks]
    assert packed[0]["len"] == packed[1]["len"], "the ranks' epochs differ in length"
    for epoch in range(2):
        assert all(len(p["epochs"][epoch]) == p["len"][epoch] for p in packed)
        shards = [_flat(p["epochs"][epoch]) for p in packed]
        assert not set(shards[0]) & set(shards[1]), "a token served on both ranks"
        assert sorted(shards[0] + shards[1]) == list(range(packed[0]["num_tokens"]))
        assert all(p["totals"][epoch] == packed[0]["num_tokens"] for p in packed)  # the all_reduce saw them all
    assert sum(p["stats"]["padding_rows"] for p in packed) > 0, "the workload should leave the ranks uneven"
    for rank, p in enumerate(packed):
        assert (p["stats"]["rank"], p["stats"]["world_size"]) == (rank, WORLD)
        assert p["epochs"][0] != p["epochs"][1]  # reshuffled per epoch


def test_packed_rank_serves_what_rank_and_world_size_name(ranks):
    import distributed_job as job  # tests/ is on sys.path

    for rank, result in enumerate(ranks):
        p = result["packed"]
        loader = stoker.PackedLoader(job.packed_documents(), job.PACK_LEN, job.BATCH, window=16,
                                     return_doc_ids=True, rank=rank, world_size=WORLD)
        assert [[job.packed_tokens(b) for b in loader] for _ in range(2)] == p["epochs"]


def test_packed_resume_on_every_rank_continues_exactly(ranks):
    for rank, result in enumerate(ranks):
        p = result["packed"]
        assert (p["state"]["rank"], p["state"]["world_size"], p["state"]["batches_served"]) == (rank, WORLD, 2)
        assert p["head"] + p["tail"] == p["epochs"][0]


def test_world_size_one_gives_every_rank_the_whole_epoch(ranks):
    plain = [[int(i) for i in b] for b in stoker.DataLoader(np.arange(N), batch_size=BATCH)]
    assert all(r["whole"]["plain"] == plain for r in ranks)
    assert ranks[0]["whole"]["packed"] == ranks[1]["whole"]["packed"]
    assert sorted(t for b in ranks[0]["whole"]["packed"] for t in b) == list(range(ranks[0]["packed"]["num_tokens"]))

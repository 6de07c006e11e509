"""Resumes in a fresh process: a user's sampler and a stateful map-style dataset (tests/resume_job.py runs the
saving and the resuming processes).

The saving process runs the uninterrupted loop and records, at the save point, ``loader.state_dict()`` (as
JSON) and torch's global RNG, then what the loop got afterwards: the rest of that epoch and the next, each batch
with the loop's own draw from the global RNG. The resuming process builds a new loader (its global RNG
elsewhere, maybe another ``num_workers``), loads the state (having restored torch's RNG from the checkpoint, or
not) and runs the same loop. Compared value by value:

* the batches, always for the rest of the saved epoch, and for the next epoch whenever the sampler's
  randomness is its own (a generator, its own state) or the global RNG was restored;
* with the global RNG restored, the loop's own draws and the global RNG at the end: a resume draws nothing
  from it that the uninterrupted run had not drawn;
* the sampler's and the loader's generators at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same, roundtrip

import stoker

JOB = Path(__file__).with_name("resume_job.py")
STOKER = Path(stoker.__file__).resolve().parents[1]  # the folder stoker is imported from

# Where the state is taken in the second epoch: after k of its 6 batches, or after its iterator ended.
POINTS = [0, 1, 3, 6, "stopped"]
# Samplers whose next epoch is drawn from torch's global RNG: exact then only when the user restores it.
GLOBAL_SEEDED = {"RandomSampler", "BatchSampler_RandomSampler", "loader_generator"}


def _run(*args) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # The stoker this test imported (the installed wheel under CI, python/ in a checkout), and tests/ for the job.
    env["PYTHONPATH"] = os.pathsep.join([str(STOKER), str(JOB.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(JOB), *args], env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"


def run_scenarios(tmp_path, sampler, dataset, runs, **spec):
    """Runs the saving and then the resuming process; returns {scenario name: (saved, resumed, state)}."""
    spec = {"sampler": sampler, "dataset": dataset, "scenarios": runs, **spec}
    saved_dir, resumed_dir = tmp_path / "saved", tmp_path / "resumed"
    saved_dir.mkdir()
    resumed_dir.mkdir()
    _run("save", json.dumps(spec), str(saved_dir))
    _run("resume", json.dumps(spec), str(resumed_dir), str(saved_dir))
    out = {}
    for run in runs:
        name = run["name"]
        out[name] = (torch.load(saved_dir / f"{name}.pt", weights_only=False),
                     torch.load(resumed_dir / f"{name}.pt", weights_only=False),
                     json.loads((saved_dir / f"{name}.json").read_text()))
    return out


def scenarios(workers, points, restore=True):
    """(num_workers saving, num_workers resuming) x save points, the resuming process restoring torch's RNG
    or not."""
    return [{"name": f"w{a}to{b}_at{p}_{'restored' if restore else 'fresh'}", "workers": [a, b], "point": p,
             "restore_rng": restore}
            for a, b in workers for p in points]


# Every point with the same num_workers, two with another, and the rest of an epoch without restoring the RNG.
SCENARIOS = (scenarios([(0, 0), (2, 2)], POINTS) + scenarios([(0, 2), (2, 0)], [1, 3])
             + scenarios([(0, 0)], [0, 3], restore=False) + scenarios([(2, 2)], [3, "stopped"], restore=False))


def assert_epochs(resumed, expected, what):
    assert [len(e) for e in resumed] == [len(e) for e in expected], f"{what}: batches per epoch differ"
    for i, (got, want) in enumerate(zip(resumed, expected)):
        for j, ((batch, _), (reference, _)) in enumerate(zip(got, want)):
            assert_same(batch, reference, f"{what}: epoch {i} after the save, batch {j}")


def assert_draws(resumed, expected, what):
    """The loop's own draws from the global RNG after each batch."""
    for i, (got, want) in enumerate(zip(resumed, expected)):
        for j, ((_, draw), (_, reference)) in enumerate(zip(got, want)):
            assert torch.equal(draw, reference), f"{what}: the loop's draw after batch {j} of epoch {i} differs"


def check_scenario(name, saved, resumed, state, sampler):
    restored = name.endswith("_restored")
    assert roundtrip(state) == state  # json, then torch.save / torch.load(weights_only=True)
    assert resumed["reported"] == state, f"{name}: a loaded loader reports the loaded state before iterating"
    expected, got = saved["after"], resumed["after"]
    exact_later = restored or sampler not in GLOBAL_SEEDED
    if exact_later:
        assert_epochs(got, expected, name)
    elif state["sampler_drawn"]:
        # The saved epoch's order was drawn before the save point: its rest is exact whatever the global RNG
        # holds. (With nothing drawn yet, as at the start of an epoch loaded without workers, the order is
        # drawn after the save point from the global RNG: exact when it is restored.)
        assert_epochs(got[:1], expected[:1], name)
    if restored:
        assert_draws(got, expected, name)
        assert torch.equal(resumed["finals"]["global"], saved["finals"]["global"]), \
            f"{name}: torch's global RNG ends elsewhere than in the uninterrupted run"
    for key in ("sampler_generator", "loader_generator"):
        want = saved["finals"][key]
        if want is not None and exact_later:
            assert torch.equal(resumed["finals"][key], want), f"{name}: the {key} ends elsewhere"


SAMPLERS = ["RandomSampler", "RandomSampler_generator", "BatchSampler_RandomSampler",
            "BatchSampler_RandomSampler_generator", "loader_generator", "stateful"]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_user_sampler_resumes_exactly_in_a_fresh_process(tmp_path, sampler):
    results = run_scenarios(tmp_path, sampler, "python", SCENARIOS)
    for name, (saved, resumed, state) in results.items():
        check_scenario(name, saved, resumed, state, sampler)
        assert state["format"] == "stoker.DataLoader/2" and state["sampler"] == "user"
        if sampler == "stateful":
            assert state["rng"] is None and state["sampler_drawn"] is None
            served = state["batches_served"]
            # At an epoch's start (or between epochs), the sampler's state as the epoch before left it.
            assert state["sampler_state"] == {"yielded": 23 if served == 0 or state["base_seed"] is None
                                              else min(4 * served, 23)}
            # nothing replayed: the resumed sampler yielded exactly the samples the resumed loop received
            assert resumed["produced"] == sum(len(b[0]) for e in resumed["after"] for b in e), name
        elif state["base_seed"] is not None:  # mid-epoch: what the epoch's draws started from
            assert state["sampler_drawn"] >= state["batches_served"]
            keys = {"RandomSampler": {"torch"}, "RandomSampler_generator": {"sampler_generator"},
                    "BatchSampler_RandomSampler": {"torch"},
                    "BatchSampler_RandomSampler_generator": {"sampler_generator"},
                    "loader_generator": {"loader_generator", "torch"}}[sampler]
            assert set(state["rng"]) == keys
        else:  # between epochs: only generators, as they stand
            assert state["sampler_drawn"] is None
            assert set(state["rng"] or {}) <= {"sampler_generator", "loader_generator"}


@pytest.mark.parametrize("sampler", ["RandomSampler", "stateful"])
def test_user_sampler_over_an_array_dataset_resumes_in_a_fresh_process(tmp_path, sampler):
    """TensorDataset: gathered natively, on threads with num_workers=2, its sampler read ahead."""
    workers = [(0, 0), (2, 2), (0, 2), (2, 0)]
    results = run_scenarios(tmp_path, sampler, "tensor", scenarios(workers, [1, "stopped"]))
    for name, (saved, resumed, state) in results.items():
        check_scenario(name, saved, resumed, state, sampler)


def test_stateful_dataset_resumes_per_worker_in_a_fresh_process(tmp_path):
    """A dataset counting the samples each of its objects served: in the main process one count, with worker
    processes one per copy; the counts go on from the save point as in the uninterrupted run."""
    results = run_scenarios(tmp_path, "shuffle", "counting", scenarios([(0, 0), (2, 2)], POINTS))
    for name, (saved, resumed, state) in results.items():
        check_scenario(name, saved, resumed, state, "shuffle")
        main = name.startswith("w0")
        if main:
            assert state["workers"] is None
            served = 2 * 23 if state["base_seed"] is None else 23 + min(4 * state["batches_served"], 23)
            assert state["dataset_state"] == {"count": served}
        elif state["base_seed"] is not None:  # mid-epoch: each copy's count after the batches received from it
            counts = [w["state"]["count"] for w in state["workers"]]
            served = state["batches_served"]
            assert sum(counts) == min(4 * served, 23)
            assert state["next_worker"] == served % 2
        # values: [index, count of the object that loaded it, its worker id]
        for epoch in resumed["after"]:
            for batch, _ in epoch:
                assert (batch[:, 2] == (-1 if main else batch[0, 2])).all()


def test_stateful_dataset_with_persistent_workers_resumes_in_a_fresh_process(tmp_path):
    """Persistent workers keep their copies across epochs: a state taken in the second epoch (or between
    epochs) holds each copy's count, the first epoch's included."""
    results = run_scenarios(tmp_path, "shuffle", "counting", scenarios([(2, 2)], POINTS), persistent=True)
    for name, (saved, resumed, state) in results.items():
        check_scenario(name, saved, resumed, state, "shuffle")
        counts = [w["state"]["count"] for w in state["workers"]]
        served = 23 * 2 if state["base_seed"] is None else 23 + min(4 * state["batches_served"], 23)
        assert sum(counts) == served, name
        assert all(c > 0 for c in counts)


def _counting(num_workers, **kwargs):
    from resume_job import Counting

    return stoker.DataLoader(Counting(), batch_size=4, shuffle=True, num_workers=num_workers, **kwargs)


@pytest.mark.parametrize("workers", [(2, 0), (2, 3), (2, "thread")], ids=lambda w: f"{w[0]}to{w[1]}")
def test_per_worker_dataset_states_need_the_same_worker_processes(workers):
    a = _counting(workers[0])
    it = iter(a)
    next(it)
    next(it)
    state = json.loads(json.dumps(a.state_dict()))
    del it
    assert len(state["workers"]) == 2
    b = _counting(2, worker_mode="thread") if workers[1] == "thread" else _counting(workers[1])
    untouched = b.state_dict()
    with pytest.raises(ValueError, match="2 worker process"):
        b.load_state_dict(state)
    assert b.state_dict() == untouched


def test_dataset_state_into_a_dataset_without_one_is_rejected():
    a = _counting(0)
    it = iter(a)
    next(it)
    state = a.state_dict()
    assert state["dataset_state"] == {"count": 4}
    b = stoker.DataLoader(list(range(23)), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="dataset_state"):
        b.load_state_dict(state)

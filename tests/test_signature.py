"""stoker.DataLoader is a drop-in for torch's: signature, subclassing, constructor errors, attributes, rebuilding
from attributes (as Lightning does), iterator lifecycle, and delegation of iterable datasets."""

from __future__ import annotations

import inspect
import random
import warnings

import numpy as np
import pytest
import torch
from helpers import (
    MapDataset,
    TorchDataLoader,
    assert_batches_equal,
    assert_loaders_match,
    raises_same,
)
from torch.utils.data import BatchSampler, IterableDataset, RandomSampler, SequentialSampler, TensorDataset

import stoker

N = 20


def _tensor_ds():
    return TensorDataset(torch.arange(N * 2.0).reshape(N, 2), torch.arange(N))


def _sample(i):
    return {"x": np.full(2, i, np.float32), "i": i}


def _python_ds():
    return MapDataset(_sample, N)


DATASETS = {
    "TensorDataset": _tensor_ds,
    "ndarray": lambda: np.arange(N * 3, dtype=np.float32).reshape(N, 3),
    "ArrayDataset": lambda: stoker.ArrayDataset(np.arange(N * 3.0).reshape(N, 3), label=np.arange(N)),
    "python": _python_ds,
}


class Numbers(IterableDataset):
    def __init__(self, n=11):
        self.n = n

    def __iter__(self):
        for i in range(self.n):
            yield {"i": i, "x": torch.full((2,), float(i))}


class SizedNumbers(Numbers):
    def __len__(self):
        return self.n


# --------------------------------------------------------------------------------------------------------------
# Signature and type
# --------------------------------------------------------------------------------------------------------------


def test_signature_starts_with_torchs_parameters():
    torch_params = list(inspect.signature(TorchDataLoader.__init__).parameters.values())
    stoker_params = list(inspect.signature(stoker.DataLoader.__init__).parameters.values())
    assert len(stoker_params) >= len(torch_params)
    for t, s in zip(torch_params, stoker_params):
        assert (s.name, s.kind, s.default) == (t.name, t.kind, t.default), f"parameter {t.name}"
    # anything stoker adds comes after torch's parameters and is keyword-only with a default
    for extra in stoker_params[len(torch_params):]:
        assert extra.kind is inspect.Parameter.KEYWORD_ONLY and extra.default is not inspect.Parameter.empty
    assert "seed" in [p.name for p in stoker_params[len(torch_params):]]


def test_class_signature_matches_init():
    # inspect.signature(cls) is what most tools (Lightning, Accelerate, jsonargparse) read
    cls_params = list(inspect.signature(stoker.DataLoader).parameters)
    init_params = list(inspect.signature(stoker.DataLoader.__init__).parameters)[1:]
    assert cls_params == init_params


def test_is_a_torch_dataloader():
    loader = stoker.DataLoader(_tensor_ds())
    assert isinstance(loader, TorchDataLoader)
    assert issubclass(stoker.DataLoader, TorchDataLoader)


def test_positional_arguments_like_torch():
    ds = _tensor_ds()
    gen_t, gen_s = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    args = (4, False, None, None, 0, None, False, True, 0, None, None)
    t = TorchDataLoader(ds, *args, gen_t)
    s = stoker.DataLoader(ds, *args, gen_s)
    assert (s.batch_size, s.drop_last, s.generator) == (4, True, gen_s)
    assert_batches_equal(list(s), list(t))


# --------------------------------------------------------------------------------------------------------------
# Constructor errors: identical type and message
# --------------------------------------------------------------------------------------------------------------

BAD_ARGS = {
    "negative-num_workers": dict(num_workers=-1),
    "negative-timeout": dict(timeout=-1),
    "prefetch_factor-without-workers": dict(prefetch_factor=2),
    "negative-prefetch_factor": dict(prefetch_factor=-1, num_workers=2),
    "persistent_workers-without-workers": dict(persistent_workers=True),
    "bad-multiprocessing_context-string": dict(multiprocessing_context="bogus", num_workers=2),
    "bad-multiprocessing_context-type": dict(multiprocessing_context=123, num_workers=2),
    "multiprocessing_context-without-workers": dict(multiprocessing_context="spawn"),
    "sampler-and-shuffle": dict(sampler=SequentialSampler(range(N)), shuffle=True),
    "batch_sampler-and-batch_size": dict(batch_sampler=[[0, 1]], batch_size=2),
    "batch_sampler-and-shuffle": dict(batch_sampler=[[0, 1]], shuffle=True),
    "batch_sampler-and-drop_last": dict(batch_sampler=[[0, 1]], drop_last=True),
    "batch_sampler-and-sampler": dict(batch_sampler=[[0, 1]], sampler=[0, 1]),
    "batch_size-None-and-drop_last": dict(batch_size=None, drop_last=True),
    "batch_size-0": dict(batch_size=0),
    "batch_size-negative": dict(batch_size=-1),
    "batch_size-np.int64": dict(batch_size=np.int64(3)),
    "batch_size-float": dict(batch_size=2.0),
    "batch_size-bool": dict(batch_size=True),
    "drop_last-np.bool_": dict(drop_last=np.bool_(True)),
    "drop_last-int": dict(drop_last=1),
}


@pytest.mark.parametrize("dataset", ["TensorDataset", "python"])
@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_constructor_errors_match_torch(case, dataset):
    ds = DATASETS[dataset]()
    kwargs = BAD_ARGS[case]
    raises_same(lambda: TorchDataLoader(ds, **kwargs), lambda: stoker.DataLoader(ds, **kwargs))


@pytest.mark.parametrize(
    "kwargs", [dict(shuffle=True), dict(sampler=[1]), dict(batch_sampler=[[1]])], ids=["shuffle", "sampler", "batch_sampler"]
)
def test_iterable_dataset_constructor_errors_match_torch(kwargs):
    raises_same(lambda: TorchDataLoader(Numbers(), **kwargs), lambda: stoker.DataLoader(Numbers(), **kwargs))


@pytest.mark.parametrize("seed", [-1, 1.5, True, "7", 2**64], ids=repr)
def test_bad_seed_raises(seed):
    with pytest.raises(ValueError, match="seed"):
        stoker.DataLoader(_tensor_ds(), seed=seed)


def test_num_workers_float_fails_at_iter_like_torch():
    for make in DATASETS.values():
        ds = make()
        t = TorchDataLoader(ds, num_workers=2.0)
        s = stoker.DataLoader(ds, num_workers=2.0)  # construction succeeds, as in torch
        raises_same(lambda: iter(t), lambda: iter(s))


def test_timeout_without_workers_fails_at_iter_like_torch():
    for make in DATASETS.values():
        ds = make()
        t = TorchDataLoader(ds, timeout=1.0)
        s = stoker.DataLoader(ds, timeout=1.0)
        err = raises_same(lambda: iter(t), lambda: iter(s))
        assert type(err) is AssertionError


# --------------------------------------------------------------------------------------------------------------
# Attributes
# --------------------------------------------------------------------------------------------------------------

FROZEN = ["batch_size", "batch_sampler", "sampler", "drop_last", "dataset", "persistent_workers"]


@pytest.mark.parametrize("attr", FROZEN)
def test_attributes_immutable_like_torch(attr):
    ds = _tensor_ds()
    t, s = TorchDataLoader(ds, batch_size=2), stoker.DataLoader(ds, batch_size=2)
    value = getattr(t, attr)
    raises_same(lambda: setattr(t, attr, value), lambda: setattr(s, attr, value))


def test_multiprocessing_context_setter_validates_like_torch():
    ds = _tensor_ds()
    t, s = TorchDataLoader(ds, num_workers=2), stoker.DataLoader(ds, num_workers=2)
    raises_same(lambda: setattr(t, "multiprocessing_context", "bogus"),
                lambda: setattr(s, "multiprocessing_context", "bogus"))


def test_mutable_attributes_stay_mutable():
    s = stoker.DataLoader(_tensor_ds(), batch_size=4)
    s.num_workers = 2
    s.pin_memory = False
    s.timeout = 0
    assert s.num_workers == 2
    assert_batches_equal(list(s), list(TorchDataLoader(_tensor_ds(), batch_size=4)))


MIRROR_CASES = {
    "defaults": dict(),
    "bs4-drop_last": dict(batch_size=4, drop_last=True),
    "shuffle": dict(batch_size=3, shuffle=True),
    "workers": dict(batch_size=3, num_workers=2, prefetch_factor=3, persistent_workers=True, timeout=5.0),
    "batch_size-None": dict(batch_size=None),
    "sampler": dict(batch_size=2, sampler=[3, 1, 2]),
    "batch_sampler": dict(batch_sampler=[[0, 1], [2]]),
    "misc": dict(pin_memory=False, in_order=False, pin_memory_device="", worker_init_fn=print, collate_fn=list),
    "mp-context": dict(num_workers=2, multiprocessing_context="spawn"),
}
MIRRORED = [
    "dataset", "batch_size", "num_workers", "prefetch_factor", "pin_memory", "pin_memory_device", "timeout",
    "worker_init_fn", "multiprocessing_context", "drop_last", "persistent_workers", "in_order", "generator",
    "collate_fn", "_auto_collation", "_dataset_kind",
]


@pytest.mark.parametrize("case", list(MIRROR_CASES))
def test_public_attributes_mirror_torch(case):
    ds = _tensor_ds()
    kwargs = MIRROR_CASES[case]
    t, s = TorchDataLoader(ds, **kwargs), stoker.DataLoader(ds, **kwargs)
    for name in MIRRORED:
        assert getattr(s, name) == getattr(t, name), name
    for name in ["sampler", "batch_sampler", "_index_sampler"]:
        assert type(getattr(s, name)) is type(getattr(t, name)), name
    assert s.seed is None
    # every public attribute torch sets, stoker sets too
    assert {k for k in vars(t) if not k.startswith("_")} <= {k for k in vars(s) if not k.startswith("_")}


def test_seed_is_an_attribute():
    assert stoker.DataLoader(_tensor_ds(), shuffle=True, seed=123).seed == 123


def _lightning_style_rebuild(loader):
    """What Lightning's _update_dataloader does: read the constructor's parameters from the loader's public
    attributes and instantiate ``type(loader)(**kwargs)``."""
    params = inspect.signature(type(loader).__init__).parameters
    attrs = {k: v for k, v in vars(loader).items() if not k.startswith("_")}
    kwargs = {name: attrs[name] for name in params if name in attrs}
    kwargs["multiprocessing_context"] = loader.multiprocessing_context  # a property on torch's loader
    if loader.batch_sampler is None or type(loader.batch_sampler) is BatchSampler:
        kwargs["batch_sampler"] = None  # the default one is re-derived from sampler/batch_size/drop_last
    else:
        kwargs.update(sampler=None, batch_size=1, drop_last=False)
    return type(loader)(**kwargs)


REBUILD_CASES = {
    "TensorDataset-bs3-drop_last-workers2-seed": ("TensorDataset", dict(batch_size=3, drop_last=True, num_workers=2, seed=5)),
    "ndarray-bs4": ("ndarray", dict(batch_size=4)),
    "ArrayDataset-prefetch": ("ArrayDataset", dict(batch_size=6, num_workers=2, prefetch_factor=4)),
    "python-collate_fn": ("python", dict(batch_size=5, collate_fn=list)),
    "python-batch_sampler": ("python", dict(batch_sampler=[[3, 2], [1], [0, 19, 18]])),
    "TensorDataset-sampler": ("TensorDataset", dict(batch_size=2, sampler=[4, 1, 7, 7])),
    "python-batch_size-None": ("python", dict(batch_size=None, num_workers=2)),
}


@pytest.mark.parametrize("case", list(REBUILD_CASES))
def test_lightning_style_rebuild_gives_same_batches(case):
    dataset, kwargs = REBUILD_CASES[case]
    loader = stoker.DataLoader(DATASETS[dataset](), **kwargs)
    rebuilt = _lightning_style_rebuild(loader)
    assert type(rebuilt) is stoker.DataLoader
    assert rebuilt.seed == loader.seed
    assert len(rebuilt) == len(loader)
    assert_batches_equal(list(rebuilt), list(loader))


# --------------------------------------------------------------------------------------------------------------
# Iterator lifecycle
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2], ids=lambda w: f"workers{w}")
@pytest.mark.parametrize("dataset", list(DATASETS))
def test_break_then_iterate_again(dataset, num_workers):
    ds = DATASETS[dataset]()
    loader = stoker.DataLoader(ds, batch_size=3, num_workers=num_workers)
    for i, _ in enumerate(loader):
        if i == 1:
            break
    expected = list(TorchDataLoader(ds, batch_size=3))
    assert_batches_equal(list(loader), expected)
    assert_batches_equal(list(loader), expected)


@pytest.mark.parametrize("num_workers", [0, 2], ids=lambda w: f"workers{w}")
@pytest.mark.parametrize("dataset", list(DATASETS))
def test_two_iterators_interleaved(dataset, num_workers):
    ds = DATASETS[dataset]()
    loader = stoker.DataLoader(ds, batch_size=3, num_workers=num_workers)
    expected = list(TorchDataLoader(ds, batch_size=3))
    a, b = iter(loader), iter(loader)
    got_a, got_b = [], []
    next_b = next(b)  # b is one batch ahead of a
    got_b.append(next_b)
    for batch in a:
        got_a.append(batch)
        try:
            got_b.append(next(b))
        except StopIteration:
            pass
    assert_batches_equal(got_a, expected)
    assert_batches_equal(got_b, expected)


def test_exhausted_iterator_keeps_raising_stop_iteration():
    for make in DATASETS.values():
        it = iter(stoker.DataLoader(make(), batch_size=8))
        assert len(list(it)) == 3
        for _ in range(2):
            with pytest.raises(StopIteration):
                next(it)


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_persistent_workers_reiterate(dataset):
    ds = DATASETS[dataset]()
    loader = stoker.DataLoader(ds, batch_size=4, num_workers=2, persistent_workers=True)
    expected = list(TorchDataLoader(ds, batch_size=4))
    for _ in range(3):
        assert_batches_equal(list(loader), expected)


@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_worker_init_fn_once_per_worker_per_epoch_python_dataset_threads(num_workers):
    # torch calls worker_init_fn(worker_id) in every worker, for every epoch (workers are not persistent)
    calls = []
    loader = stoker.DataLoader(_python_ds(), batch_size=2, num_workers=num_workers, worker_init_fn=calls.append,
                               worker_mode="thread")
    for epoch in range(2):
        list(loader)
        assert sorted(calls) == sorted(list(range(num_workers)) * (epoch + 1))


class _RecordInit:
    """A worker_init_fn that leaves a file per call, so calls made in worker processes can be counted."""

    def __init__(self, folder):
        self.folder = folder

    def __call__(self, worker_id):
        import os

        info = torch.utils.data.get_worker_info()
        assert info is not None and info.id == worker_id
        (self.folder / f"{os.getpid()}-{worker_id}").write_text(str(info.seed))


@pytest.mark.parametrize("persistent", [False, True], ids=["fresh", "persistent"])
@pytest.mark.parametrize("num_workers", [1, 2])
def test_worker_init_fn_runs_in_each_worker_process(num_workers, persistent, tmp_path):
    loader = stoker.DataLoader(_python_ds(), batch_size=2, num_workers=num_workers, worker_init_fn=_RecordInit(tmp_path),
                               persistent_workers=persistent)
    for epoch in range(2):
        list(loader)
        calls = sorted(p.name for p in tmp_path.iterdir())
        expected = num_workers * (1 if persistent else epoch + 1)
        assert len(calls) == expected
        assert sorted(int(c.split("-")[1]) for c in calls) == sorted(list(range(num_workers)) * (expected // num_workers))
        assert all(int(c.split("-")[0]) != __import__("os").getpid() for c in calls)  # not in this process


def test_pin_memory_without_accelerator_warns_like_torch():
    if torch.accelerator.is_available():
        pytest.skip("this checks the no-accelerator warning")
    for make in DATASETS.values():
        ds = make()
        for extra in ({}, {"pin_memory_device": "cuda"}):
            caught = []
            for cls in (TorchDataLoader, stoker.DataLoader):
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    batches = list(cls(ds, batch_size=4, pin_memory=True, **extra))
                caught.append(([(x.category, str(x.message)) for x in w], batches))
            assert caught[1][0] == caught[0][0]
            assert_batches_equal(caught[1][1], caught[0][1])


def test_pin_memory_on_a_torch_without_torch_accelerator(monkeypatch):
    # torch.accelerator exists from torch 2.6; before it, pin_memory asks CUDA (stoker supports torch >= 2.1).
    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU path")
    monkeypatch.delattr(torch, "accelerator")
    with pytest.warns(UserWarning, match="no accelerator is found"):
        batches = list(stoker.DataLoader(np.arange(10), batch_size=4, pin_memory=True))
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize("num_workers", [0, 2], ids=lambda w: f"workers{w}")
@pytest.mark.parametrize("dataset", list(DATASETS))
def test_global_rng_consumed_like_torch_without_shuffle(dataset, num_workers):
    # torch draws one base seed per iterator; code after the loop (model init, dropout) must see the same RNG.
    ds = DATASETS[dataset]()
    after = []
    for cls in (TorchDataLoader, stoker.DataLoader):
        torch.manual_seed(1234)
        kwargs = {"num_workers": num_workers} if cls is stoker.DataLoader else {}
        list(cls(ds, batch_size=4, **kwargs))
        it = iter(cls(ds, batch_size=4, **kwargs))
        next(it)
        del it
        after.append(torch.rand(3))
    assert torch.equal(after[0], after[1])


def _random_sample(i):
    return torch.rand(2) + i, random.random(), float(np.random.rand())


def test_random_augmentation_in_main_thread_reproduces_torch():
    # num_workers=0 loads in the calling thread, as torch does: a dataset drawing from torch's, Python's and
    # numpy's global RNGs sees exactly the draws it sees under torch
    out = []
    for cls in (TorchDataLoader, stoker.DataLoader):
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        out.append([list(cls(MapDataset(_random_sample, 10), batch_size=3)) for _ in range(2)])
    assert_batches_equal(out[1][0] + out[1][1], out[0][0] + out[0][1])


def test_generator_consumed_like_torch_without_shuffle():
    ds = _tensor_ds()
    draws = []
    for cls in (TorchDataLoader, stoker.DataLoader):
        g = torch.Generator().manual_seed(99)
        list(cls(ds, batch_size=4, generator=g))
        draws.append(torch.rand(2, generator=g))
    assert torch.equal(draws[0], draws[1])


# --------------------------------------------------------------------------------------------------------------
# Iterable datasets in the main process (workers: tests/test_iterable.py)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [dict(batch_size=3), dict(batch_size=3, drop_last=True), dict(batch_size=None), dict(batch_size=4, collate_fn=list)],
    ids=["bs3", "bs3-drop_last", "bs-None", "collate_fn"],
)
def test_iterable_dataset_matches_torch(kwargs):
    assert_loaders_match(Numbers(), **kwargs)


def test_sized_iterable_dataset_len_matches_torch():
    for kwargs in (dict(batch_size=3), dict(batch_size=3, drop_last=True), dict(batch_size=None)):
        assert len(stoker.DataLoader(SizedNumbers(), **kwargs)) == len(TorchDataLoader(SizedNumbers(), **kwargs))
    assert_loaders_match(SizedNumbers(), batch_size=4)


def test_iterable_dataset_reiterates():
    loader = stoker.DataLoader(Numbers(), batch_size=5)
    expected = list(TorchDataLoader(Numbers(), batch_size=5))
    for _ in range(2):
        assert_batches_equal(list(loader), expected)


def test_random_sampler_attribute_is_torchs():
    # shuffle=True builds torch's RandomSampler (read by tools that inspect loader.sampler)
    loader = stoker.DataLoader(_tensor_ds(), batch_size=2, shuffle=True)
    assert type(loader.sampler) is RandomSampler
    assert len(loader.sampler) == N

"""Native shuffling: every epoch is a permutation; the order is a pure function of (seed, epoch), the same for any
num_workers and for array and Python datasets; seeds come from seed=, generator= or torch's global RNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import MapDataset, flat_labels
from torch.utils.data import TensorDataset

import stoker

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

N = 1000


def _rows(n=N):
    """Rows whose values encode their index: row i is [10 i, 10 i + 1, 10 i + 2]."""
    return (np.arange(n, dtype=np.int64)[:, None] * 10 + np.arange(3)).astype(np.int64)


def _identity(i):
    return i


def _row_and_label(i):
    return (np.arange(3, dtype=np.int64) + 10 * i, i)


DATASETS = {
    "TensorDataset": lambda n=N: TensorDataset(torch.from_numpy(_rows(n)), torch.arange(n)),
    "ArrayDataset": lambda n=N: stoker.ArrayDataset(_rows(n), np.arange(n)),
    "python": lambda n=N: MapDataset(_row_and_label, n),
}


def order(loader) -> list[int]:
    """The sample indices of one epoch, checking every row matches its label on the way."""
    out = []
    for rows, labels in loader:
        rows, labels = torch.as_tensor(rows), torch.as_tensor(labels)
        assert torch.equal(rows, labels[:, None] * 10 + torch.arange(3)), "a row does not belong to its label"
        out.extend(labels.tolist())
    return out


def index_order(loader) -> list[int]:
    """The epoch order of a loader over a dataset whose samples are their own index (a 1-d array/tensor)."""
    return flat_labels(loader)


def _check_permutation(seq, n):
    assert len(seq) == n
    assert sorted(seq) == list(range(n))


# --------------------------------------------------------------------------------------------------------------
# Permutations
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2], ids=lambda w: f"workers{w}")
@pytest.mark.parametrize("dataset", list(DATASETS))
def test_each_epoch_is_a_permutation_and_epochs_differ(dataset, num_workers):
    loader = stoker.DataLoader(DATASETS[dataset](), batch_size=64, shuffle=True, num_workers=num_workers)
    epochs = [order(loader) for _ in range(3)]
    for e in epochs:
        _check_permutation(e, N)
        assert e != list(range(N)), "not shuffled"
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]


@pytest.mark.parametrize(
    "n,batch_size",
    [(n, bs) for n in (1, 2, 3, 5, 17, 1000, 4097) for bs in (1, 3, 64, 5000) if not (n >= 1000 and bs == 1)],
    ids=lambda v: str(v),
)
def test_permutation_for_any_size(n, batch_size):
    data = np.arange(n)
    for seed in (0, 1, 2**40 + 3):
        loader = stoker.DataLoader(data, batch_size=batch_size, shuffle=True, seed=seed)
        batches = list(loader)
        assert len(batches) == len(loader) == -(-n // batch_size)
        assert all(len(b) == batch_size for b in batches[:-1])
        _check_permutation(index_order(batches), n)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 1000, 4097])
@pytest.mark.parametrize("batch_size", [3, 64])
def test_permutation_python_dataset(n, batch_size):
    loader = stoker.DataLoader(MapDataset(_identity, n), batch_size=batch_size, shuffle=True, seed=11)
    _check_permutation(index_order(loader), n)


@pytest.mark.parametrize("n", [2, 3])
def test_small_datasets_reach_every_order(n):
    import itertools

    seen = {tuple(index_order(stoker.DataLoader(np.arange(n), batch_size=n, shuffle=True, seed=s))) for s in range(300)}
    assert seen == set(itertools.permutations(range(n)))


@pytest.mark.parametrize("dataset", ["ndarray", "python"])
@pytest.mark.parametrize("batch_size", [1, 3, 7, 64])
def test_drop_last_drops_exactly_the_tail(dataset, batch_size):
    n = 101
    data = np.arange(n) if dataset == "ndarray" else MapDataset(_identity, n)
    full = index_order(stoker.DataLoader(data, batch_size=batch_size, shuffle=True, seed=4))
    dropped = list(stoker.DataLoader(data, batch_size=batch_size, shuffle=True, seed=4, drop_last=True))
    assert all(len(b) == batch_size for b in dropped)
    assert index_order(dropped) == full[: (n // batch_size) * batch_size]


@pytest.mark.parametrize("num_workers", [0, 2], ids=lambda w: f"workers{w}")
def test_batch_size_none_shuffles_samples(num_workers):
    loader = stoker.DataLoader(MapDataset(_identity, 50), batch_size=None, shuffle=True, seed=3, num_workers=num_workers)
    out = list(loader)
    assert all(type(v) is int for v in out)
    _check_permutation(out, 50)
    assert out != list(range(50))
    # the same order as batched loading with the same seed and epoch
    assert out == index_order(stoker.DataLoader(MapDataset(_identity, 50), batch_size=7, shuffle=True, seed=3))


# --------------------------------------------------------------------------------------------------------------
# Reproducibility
# --------------------------------------------------------------------------------------------------------------


def test_same_seed_same_order_for_any_num_workers_and_dataset_kind():
    reference = None
    for dataset in DATASETS:
        for num_workers in (0, 1, 2, 3):
            for _ in range(2):  # a fresh loader each time: seed= fixes epoch 0
                loader = stoker.DataLoader(
                    DATASETS[dataset](), batch_size=32, shuffle=True, seed=2024, num_workers=num_workers
                )
                got = [order(loader) for _ in range(2)]  # epochs 0 and 1
                if reference is None:
                    reference = got
                assert got == reference, f"{dataset}, num_workers={num_workers}"
    assert reference[0] != reference[1]


def test_order_does_not_depend_on_batch_size():
    data = np.arange(N)
    orders = {bs: index_order(stoker.DataLoader(data, batch_size=bs, shuffle=True, seed=77)) for bs in (1, 10, 333, N)}
    assert len({tuple(o) for o in orders.values()}) == 1


def test_bare_ndarray_tensor_and_python_orders_agree():
    seq = [
        index_order(stoker.DataLoader(np.arange(N), batch_size=50, shuffle=True, seed=8)),
        index_order(stoker.DataLoader(torch.arange(N), batch_size=50, shuffle=True, seed=8)),
        index_order(stoker.DataLoader(MapDataset(_identity, N), batch_size=50, shuffle=True, seed=8)),
        index_order(stoker.DataLoader(MapDataset(_identity, N), batch_size=50, shuffle=True, seed=8, num_workers=3)),
    ]
    assert all(s == seq[0] for s in seq)


def test_different_seeds_give_different_orders():
    orders = {tuple(index_order(stoker.DataLoader(np.arange(N), batch_size=N, shuffle=True, seed=s))) for s in range(5)}
    assert len(orders) == 5


@pytest.mark.parametrize("num_workers", [0, 2], ids=lambda w: f"workers{w}")
@pytest.mark.parametrize("dataset", list(DATASETS))
def test_torch_manual_seed_reproduces(dataset, num_workers):
    def run(construct_first):
        if construct_first:
            loader = stoker.DataLoader(DATASETS[dataset](), batch_size=50, shuffle=True, num_workers=num_workers)
            torch.manual_seed(31)
        else:
            torch.manual_seed(31)
            loader = stoker.DataLoader(DATASETS[dataset](), batch_size=50, shuffle=True, num_workers=num_workers)
        return [order(loader) for _ in range(2)]

    first = run(construct_first=False)
    assert run(construct_first=False) == first
    assert run(construct_first=True) == first
    assert first[0] != first[1]
    torch.manual_seed(32)
    other = order(stoker.DataLoader(DATASETS[dataset](), batch_size=50, shuffle=True, num_workers=num_workers))
    assert other != first[0]


@pytest.mark.parametrize("num_workers", [0, 2], ids=lambda w: f"workers{w}")
@pytest.mark.parametrize("dataset", list(DATASETS))
def test_generator_reproduces(dataset, num_workers):
    def run(seed):
        torch.manual_seed(seed * 7 + 1)  # the global RNG must not matter when a generator is given
        g = torch.Generator().manual_seed(seed)
        loader = stoker.DataLoader(DATASETS[dataset](), batch_size=50, shuffle=True, generator=g,
                                   num_workers=num_workers)
        return [order(loader) for _ in range(2)]

    a = run(5)
    assert run(5) == a
    assert a[0] != a[1]
    assert run(6)[0] != a[0]


def test_generator_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    list(stoker.DataLoader(np.arange(100), batch_size=10, shuffle=True, generator=g))
    assert torch.equal(torch.rand(2), expected)


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_seed_and_set_epoch(dataset):
    def loader():
        return stoker.DataLoader(DATASETS[dataset](), batch_size=100, shuffle=True, seed=99)

    history = loader()
    epochs = [order(history) for _ in range(5)]  # epochs 0..4
    assert len({tuple(e) for e in epochs}) == 5

    fresh = loader()
    fresh.set_epoch(3)
    assert order(fresh) == epochs[3]
    assert order(fresh) == epochs[4]  # the next iterator moves on to the next epoch

    busy = loader()
    for _ in range(7):
        order(busy)
    busy.set_epoch(1)
    assert order(busy) == epochs[1]
    busy.set_epoch(1)
    assert order(busy) == epochs[1]


def test_seed_ignores_global_rng_and_generator():
    a = index_order(stoker.DataLoader(np.arange(N), batch_size=N, shuffle=True, seed=5))
    torch.manual_seed(123)
    b = index_order(stoker.DataLoader(np.arange(N), batch_size=N, shuffle=True, seed=5))
    c = index_order(stoker.DataLoader(np.arange(N), batch_size=N, shuffle=True, seed=5,
                                      generator=torch.Generator().manual_seed(77)))
    assert a == b == c


def test_set_epoch_accepts_index_like_and_rejects_floats():
    loader = stoker.DataLoader(np.arange(N), batch_size=N, shuffle=True, seed=5)
    loader.set_epoch(np.int64(2))
    e2 = index_order(loader)
    loader.set_epoch(2)
    assert index_order(loader) == e2
    with pytest.raises(TypeError):
        loader.set_epoch(1.5)


def test_interleaved_iterators_get_consecutive_epochs():
    loader = stoker.DataLoader(np.arange(N), batch_size=100, shuffle=True, seed=21)
    a, b = iter(loader), iter(loader)
    got_a, got_b = [], []
    for x, y in zip(a, b):
        got_a.append(x)
        got_b.append(y)
    ref = stoker.DataLoader(np.arange(N), batch_size=100, shuffle=True, seed=21)
    assert index_order(got_a) == index_order(ref)  # epoch 0
    assert index_order(got_b) == index_order(ref)  # epoch 1


def test_shuffle_false_ignores_seed():
    assert index_order(stoker.DataLoader(np.arange(50), batch_size=7, seed=3)) == list(range(50))
    assert index_order(stoker.DataLoader(MapDataset(_identity, 50), batch_size=7, seed=3, shuffle=False)) == list(range(50))


# --------------------------------------------------------------------------------------------------------------
# Statistical sanity (deterministic: fixed seeds)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [10, 17])
def test_first_position_is_spread_over_all_indices(n):
    trials = 60 * n
    firsts = [
        index_order(stoker.DataLoader(np.arange(n), batch_size=n, shuffle=True, seed=s))[0] for s in range(trials)
    ]
    counts = np.bincount(firsts, minlength=n)
    assert counts.min() > 0, f"some index never comes first: {counts}"
    expected = trials / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # df = n - 1; a uniform shuffle exceeds 3 df + 30 with negligible probability
    assert chi2 < 3 * (n - 1) + 30, f"chi2={chi2:.1f} for counts {counts}"


def test_first_position_spread_over_epochs():
    n = 10
    loader = stoker.DataLoader(np.arange(n), batch_size=n, shuffle=True, seed=1)
    counts = np.bincount([index_order(loader)[0] for _ in range(400)], minlength=n)
    assert counts.min() > 0 and counts.max() < 3 * 400 / n, counts


def test_position_value_table_is_uniform_small_n():
    n, trials = 6, 2500
    table = np.zeros((n, n))
    for s in range(trials):
        perm = index_order(stoker.DataLoader(MapDataset(_identity, n), batch_size=n, shuffle=True, seed=s))
        table[np.arange(n), perm] += 1
    expected = trials / n
    chi2 = float(((table - expected) ** 2 / expected).sum())
    # For a uniform shuffle this statistic has mean n(n-1) = 30 and sd ~8; 80 is > 6 sd above the mean
    assert chi2 < 80, f"chi2={chi2:.1f}\n{table}"


def test_neighbouring_indices_are_not_kept_together():
    n, trials = 1000, 600
    adjacent = 0
    for s in range(trials):
        perm = np.asarray(index_order(stoker.DataLoader(np.arange(n), batch_size=n, shuffle=True, seed=s)))
        position = np.argsort(perm)
        adjacent += int((np.abs(np.diff(position)) == 1).sum())
    expected = trials * (n - 1) * 2 / n  # P(|pos(i+1) - pos(i)| == 1) = 2/n for a uniform permutation
    assert adjacent < expected + 5 * expected**0.5, f"{adjacent} adjacent pairs, {expected:.0f} expected"


def test_large_shuffle_is_a_well_mixed_permutation():
    # Past a million samples the order is computed position by position (no table); it must still be a
    # permutation without block structure or neighbours kept together.
    n = (1 << 20) + 1
    data = np.arange(n, dtype=np.int64)
    for seed in (0, 1):
        perm = next(iter(stoker.DataLoader(data, batch_size=n, shuffle=True, seed=seed))).numpy()
        assert np.array_equal(np.sort(perm), data)
        # (position bin, value bin) on a 16 x 16 grid: uniform has mean ~225 and sd ~21
        grid = np.histogram2d(np.arange(n), perm, bins=16, range=[[0, n], [0, n]])[0]
        expected = n / 256
        chi2 = float(((grid - expected) ** 2 / expected).sum())
        assert chi2 < 225 + 6 * 21, f"seed {seed}: chi2={chi2:.0f}"
        # |pos(i+1) - pos(i)| <= 1024 has probability ~2048/n in a uniform permutation
        position = np.argsort(perm)
        near = int((np.abs(np.diff(position)) <= 1024).sum())
        expected_near = 2 * 1024 * (n - 1) / n
        assert abs(near - expected_near) < 6 * expected_near**0.5, f"seed {seed}: {near} vs {expected_near:.0f}"

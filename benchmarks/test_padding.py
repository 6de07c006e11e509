"""PadCollate's native padding beside its numpy path and torch's pad_sequence, one group per input form.

Run: pytest benchmarks/test_padding.py --benchmark-only --benchmark-group-by=group
Each contender turns 256 sequences (lognormal lengths, mean about 300 tokens) into int64 ``input_ids`` and
``attention_mask`` [256, T]. "random" batches are padded to their longest (about 13 times the mean: writing the
padding dominates); "bucketed" batches hold sequences of similar lengths, as LengthBucketSampler makes them (reading
the inputs dominates). Compare the means within a group. torch runs on one thread here, as in a DataLoader
worker (on a busy 2-core machine its default two threads make pad_sequence's timings swing tenfold).
"""

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from stoker import PadCollate

BATCH = 256


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _lengths(bucketed: bool) -> np.ndarray:
    rng = np.random.default_rng(0)
    lengths = np.maximum(np.round(rng.lognormal(np.log(300) - 0.5, 1.0, 50 * BATCH)), 1).astype(np.int64)
    if bucketed:  # one batch of a length-sorted bucket, from its middle
        return np.sort(lengths)[25 * BATCH:26 * BATCH]
    return lengths[:BATCH]


FORMS = {
    "list": lambda a: a.tolist(),
    "int32 array": lambda a: a.astype(np.int32),
    "int64 tensor": lambda a: torch.from_numpy(a),
}


def _batch(form: str, bucketed: bool) -> list:
    rng = np.random.default_rng(1)
    return [FORMS[form](rng.integers(0, 50_000, int(n), dtype=np.int64)) for n in _lengths(bucketed)]


def _pad_sequence(batch):
    """The usual torch recipe: a tensor per sample, pad_sequence, and a mask from the lengths."""
    tensors = [s if isinstance(s, torch.Tensor) else torch.as_tensor(s) for s in batch]
    ids = pad_sequence(tensors, batch_first=True, padding_value=0).to(torch.int64)
    lengths = torch.tensor([len(t) for t in tensors])
    mask = (torch.arange(ids.shape[1]) < lengths[:, None]).to(torch.int64)
    return {"input_ids": ids, "attention_mask": mask}


def _numpy_path():
    collate = PadCollate()
    collate._use_native = False
    return collate


CONTENDERS = {"stoker native": PadCollate, "stoker numpy path": _numpy_path, "pad_sequence": lambda: _pad_sequence}


@pytest.mark.parametrize("bucketed", [False, True], ids=["random", "bucketed"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("contender", CONTENDERS)
def test_padding(benchmark, contender, form, bucketed):
    benchmark.group = f"padding: {BATCH} {'bucketed' if bucketed else 'random'} sequences as {form}"
    batch = _batch(form, bucketed)
    collate = CONTENDERS[contender]()
    out = benchmark.pedantic(collate, args=(batch,), rounds=30, warmup_rounds=3)
    assert out["input_ids"].shape == out["attention_mask"].shape and out["input_ids"].dtype is torch.int64

"""Documents of tokens, and the loader that packs them into fixed-length rows for language-model training."""

from __future__ import annotations

import atexit
import operator
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from stoker import _cuda, _device
from stoker._cursor import Cursor
from stoker._native import POOL, core, from_dlpack
from stoker._shard import SEED_MASK, check_count, is_seed, resolve_shard
from stoker._turns import Turns, close_in_turn, exiting, one_at_a_time

__all__ = ["PackedLoader", "TokenDataset", "write_token_files"]

TOKEN_DTYPES = (np.dtype(np.uint16), np.dtype(np.int32), np.dtype(np.uint32), np.dtype(np.int64))
_LONG_DOCS = {"split": 0, "truncate": 1, "drop": 2}
STATE_FORMAT = "stoker.PackedLoader/2"  # 2: ranks shard documents, not rows


def _token_dtype(dtype, where: str) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.newbyteorder("=") not in TOKEN_DTYPES or not dt.isnative:
        raise TypeError(f"{where}: tokens must be uint16, int32, uint32 or int64 (native byte order), got {dt}")
    return dt


def _offsets_array(offsets, where: str) -> np.ndarray:
    array = np.asarray(offsets)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{where}: offsets must be a 1-D array of at least one entry, got shape {array.shape}")
    if array.dtype.kind not in "iu":
        raise TypeError(f"{where}: offsets must be integers, got {array.dtype}")
    if array.dtype == np.uint64 and array.size and int(array.max()) > np.iinfo(np.int64).max:
        bad = int(np.argmax(array > np.iinfo(np.int64).max))
        raise ValueError(f"{where}: offsets[{bad}] = {int(array[bad])} is too large")
    return np.ascontiguousarray(array, dtype=np.int64)


class TokenDataset:
    """Documents as 1-D integer token arrays (uint16, int32, uint32 or int64), stored as one flat token array
    and ``len(self) + 1`` offsets: document ``d`` is ``tokens[offsets[d]:offsets[d + 1]]``.

    Build it from a list of arrays (``TokenDataset(docs)``), from a flat array and offsets
    (:meth:`from_flat`), or open it memory-mapped from files (:meth:`open`, written by
    :func:`write_token_files`). The offsets are checked against the tokens on construction (starting at 0,
    never decreasing, ending at the number of tokens); a bad entry raises ``ValueError`` naming it.
    """

    def __init__(self, documents: Sequence, *, dtype=None) -> None:
        arrays = []
        for i, doc in enumerate(documents):
            a = doc.numpy() if isinstance(doc, torch.Tensor) else np.asarray(doc)
            if a.ndim != 1:
                raise ValueError(f"document {i} must be 1-D, got shape {a.shape}")
            if a.size and a.dtype.kind not in "iu":
                raise TypeError(f"document {i} must hold integer tokens, got {a.dtype}")
            arrays.append(a)
        if dtype is None:
            dtype = np.result_type(*[a.dtype for a in arrays if a.size]) if any(a.size for a in arrays) else np.int32
            dtype = dtype if np.dtype(dtype) in TOKEN_DTYPES else np.int64
        dt = _token_dtype(dtype, "TokenDataset")
        lengths = np.array([a.size for a in arrays], dtype=np.int64)
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.concatenate([a.astype(dt, copy=False) for a in arrays]) if arrays else np.empty(0, dt)
        if arrays and tokens.size:
            info = np.iinfo(dt)
            for i, a in enumerate(arrays):
                if a.size and (int(a.min()) < info.min or int(a.max()) > info.max):
                    raise ValueError(f"document {i} has tokens outside the range of {dt}")
        self._init(tokens, offsets, "TokenDataset")

    def _init(self, tokens: np.ndarray, offsets: np.ndarray, where: str) -> None:
        try:
            self._source = core.TokenSource(tokens, offsets)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
        self.tokens = tokens
        self.offsets = offsets
        self._lengths = _read_only(self._source.lengths)

    @classmethod
    def from_flat(cls, tokens, offsets) -> TokenDataset:
        """Documents ``tokens[offsets[d]:offsets[d + 1]]`` of a flat 1-D token array (not copied)."""
        tokens = tokens.numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"TokenDataset.from_flat: tokens must be 1-D, got shape {tokens.shape}")
        _token_dtype(tokens.dtype, "TokenDataset.from_flat")
        self = cls.__new__(cls)
        self._init(np.ascontiguousarray(tokens), _offsets_array(offsets, "TokenDataset.from_flat"),
                   "TokenDataset.from_flat")
        return self

    @classmethod
    def open(cls, tokens_path: str | os.PathLike, offsets_path: str | os.PathLike | None = None, *,
             dtype=None) -> TokenDataset:
        """Memory-maps documents from files: a token file (``.npy``, or raw binary of ``dtype``) and an
        offsets file (``.npy`` of integers, or raw little-endian int64). ``TokenDataset.open(prefix)`` opens
        ``prefix.tokens.npy`` and ``prefix.offsets.npy`` as :func:`write_token_files` writes them.

        A file that is truncated, corrupt or inconsistent with the other raises ``ValueError`` naming the
        file and the bad entry; nothing is read outside the files."""
        tokens_path = os.fspath(tokens_path)
        if offsets_path is None:
            if not os.path.exists(tokens_path) and os.path.exists(tokens_path + ".tokens.npy"):
                tokens_path, offsets_path = tokens_path + ".tokens.npy", tokens_path + ".offsets.npy"
            else:
                raise ValueError(f"TokenDataset.open({tokens_path!r}): give the offsets file too, or the prefix "
                                 "of files written by write_token_files")
        offsets_path = os.fspath(offsets_path)
        tokens = _map_file(tokens_path, dtype, "tokens")
        _token_dtype(tokens.dtype, tokens_path)
        offsets = _offsets_array(_map_file(offsets_path, np.int64, "offsets"), offsets_path)
        self = cls.__new__(cls)
        try:
            self._source = core.TokenSource(tokens, offsets)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{offsets_path} does not fit {tokens_path} ({tokens.size} tokens): {exc}") from None
        self.tokens, self.offsets = tokens, offsets
        self._lengths = _read_only(self._source.lengths)
        return self

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        i = operator.index(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"document {i} out of range for {n} documents")
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        """The length of every document (int64, read-only)."""
        return self._lengths

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"TokenDataset({len(self)} documents, {self.num_tokens} tokens, {self.tokens.dtype})"


def _read_only(array: np.ndarray) -> np.ndarray:
    """A read-only copy: what the native planner reads cannot be changed through it."""
    copy = np.array(array)
    copy.setflags(write=False)
    return copy


def _map_file(path: str, dtype, what: str) -> np.ndarray:
    try:
        if path.endswith(".npy"):
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            if dtype is None:
                raise ValueError(f"{path}: a raw {what} file needs dtype=")
            dt = np.dtype(dtype)
            size = os.path.getsize(path)
            if size % dt.itemsize:
                raise ValueError(f"{path}: {size} bytes is not a whole number of {dt} {what}")
            array = np.memmap(path, dtype=dt, mode="r") if size else np.empty(0, dt)
    except ValueError as exc:
        if str(exc).startswith(path):
            raise
        raise ValueError(f"{path}: not a readable {what} file ({exc})") from None
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read the {what} file ({exc})") from None
    except Exception as exc:  # a corrupt .npy header can make numpy's parser raise almost anything
        raise ValueError(f"{path}: not a readable {what} file ({type(exc).__name__}: {exc})") from None
    if array.ndim != 1:
        raise ValueError(f"{path}: the {what} array must be 1-D, got shape {array.shape}")
    return array


def write_token_files(prefix: str | os.PathLike, documents: Sequence, dtype=np.uint16) -> tuple[str, str]:
    """Writes documents as ``prefix.tokens.npy`` (``dtype``) and ``prefix.offsets.npy`` (int64), the
    files :meth:`TokenDataset.open` maps. Returns the two paths."""
    prefix = os.fspath(prefix)
    ds = TokenDataset(documents, dtype=dtype)
    tokens_path, offsets_path = prefix + ".tokens.npy", prefix + ".offsets.npy"
    np.save(tokens_path, ds.tokens)
    np.save(offsets_path, ds.offsets)
    return tokens_path, offsets_path


class PackedLoader:
    """Batches of documents packed into rows of ``seq_len`` tokens, built natively.

    Each batch is a dict of ``B = batch_size`` rows (fewer in the last batch unless ``drop_last``):

    * ``input_ids`` int64 ``[B, L]``: the tokens, the tail of a row padded with ``pad_id``;
    * ``labels`` int64 ``[B, L]``: the tokens, unshifted, with -100 at the first token of every document
      segment and on padding, so the shifted loss HF models compute never predicts across documents; with
      ``shift_labels=True``, the next token instead (Megatron-style): ``labels[t] = input_ids[t + 1]`` while
      ``t + 1`` is in the same segment, -100 at the last token of every segment and on padding, so
      ``cross_entropy(logits.flatten(0, 1), labels.flatten())`` needs no shifting and equals the shifted loss
      over the default labels. For a row of documents ``[11, 12, 13]`` and ``[21, 22]`` with ``seq_len=8``::

          input_ids         [  11,   12,   13,   21,   22,    0,    0,    0]
          labels            [-100,   12,   13, -100,   22, -100, -100, -100]
          labels, shifted   [  12,   13, -100,   22, -100, -100, -100, -100]

    * ``position_ids`` int64 ``[B, L]``: restarting at 0 in every segment (the padding tail is a segment);
    * ``cu_seqlens`` int32 ``[S + 1]``: segment starts over the flattened ``B*L`` tokens, padding segments
      included, ending at ``B*L`` — also as ``cu_seq_lens_q``/``cu_seq_lens_k``, with ``max_length_q`` and
      ``max_length_k`` (Python ints), the names HF transformers reads for flash-attention varlen;
    * ``seq_idx`` int32 ``[B, L]``: the segment number of each token, for FlexAttention-style masks;
    * ``doc_ids`` int64 ``[B, L]`` (with ``return_doc_ids=True``): the document of each token, -1 on padding.

    There is no ``attention_mask``: HF models would read it as permission to attend across documents.

    Packing: with ``window=None`` the whole epoch is packed by best-fit decreasing, then the rows are
    shuffled; with ``window=W`` documents stream through a buffer of ``W`` and each row takes the oldest
    buffered ones while they fit, then the longest that still fits, so no document waits much longer than
    ``W`` divided by the documents per row. Documents longer than ``seq_len`` are split into ``seq_len``
    pieces (``long_docs="split"``, each piece a segment), cut (``"truncate"``) or skipped (``"drop"``).
    The epoch's document order is a pure function of (seed, epoch), so batches are deterministic and
    resumable (:meth:`state_dict`).

    With ``rank``/``world_size``, or under ``torch.distributed``, ranks shard documents: after the epoch's
    shuffle (the same on every rank: ``seed``, or 0 by default), rank ``r`` of ``W`` packs the documents at
    positions ``r, r + W, r + 2W, ...`` alone, so each document is packed, whole or split, on one rank and
    every token is served once per epoch across the ranks. Every rank also plans the other shards (about as
    long as planning the dataset once: 20-50 ms for 200,000 documents) to learn their row counts, so all
    ranks yield the same number of batches without communicating, as DDP needs: a rank with fewer rows than
    the most gets rows of padding only (``input_ids`` ``pad_id``, ``labels`` -100, positions from 0, one
    padding segment), spread evenly through its epoch; with ``drop_last=True`` every rank stops at the
    fewest rows instead. For ranks that plan 5 and 3 rows with ``batch_size=2``, rank 1 serves rows
    ``[pad, 0]``, ``[pad, 1]``, ``[2]``; with ``drop_last=True`` each rank serves one batch of its first two
    rows. A batch of padding only (a per-rank mean loss of 0/0) needs a rank with fewer than
    ``1 / batch_size`` of the most rows; :meth:`stats` counts padding rows and the rows and tokens cut.

    By default each batch is built when it is asked for, by the calling thread writing rows from the front
    and a helper thread writing them from the back (``helper_thread=False``, a process allowed one CPU only,
    or a batch of fewer than 8192 tokens: the calling thread alone); 8 rows of 4096 uint16 tokens from a
    memory-mapped file take about 11 us so, 16 us alone, on a 2-core VM. The helper also begins the next
    batch (into a block of its own) as soon as one is handed over, so it works while your loop runs. After a
    batch it polls for the next for 0.1 ms, then naps on timers for up to 50 ms, then sleeps; a batch that
    finds it away starts alone (so in a training loop whose steps take milliseconds it seldom takes part,
    and costs nothing).
    With ``num_threads > 0`` that many native threads build up to ``prefetch`` batches (default 4) ahead of
    the one you take, without the GIL, which pays when batches are large and your loop does work between
    them (32 rows of 8192 tokens with 4 ms of work per step, 2 cores: 4.1 ms per step against 4.35 on
    demand); for small batches and an idle loop building on demand is faster (the block just freed is
    reused while it is still in cache). The state counts the batches you have received, not those built
    ahead. Either way, when an epoch starts, the next epoch's plan is built on a thread of its own (batches
    are then written without the helper, whose core it takes), so the next epoch's first batch does not
    wait for packing.

    With ``device="cuda"`` batches are built into page-locked memory and arrive on that GPU, copied on a
    stream of stoker's own ``device_prefetch`` batches (default 2) ahead of use, as with
    :class:`stoker.DataLoader`'s ``device=``; ``max_length_q``/``max_length_k`` stay Python ints and
    ``cu_seq_lens_q``/``cu_seq_lens_k`` stay the same tensor as ``cu_seqlens``.
    """

    def __init__(self, documents, seq_len: int, batch_size: int, *, shuffle: bool = True,
                 seed: int | None = None, window: int | None = None, long_docs: str = "split",
                 pad_id: int = 0, drop_last: bool = False, return_doc_ids: bool = False, generator=None,
                 rank: int | None = None, world_size: int | None = None, num_threads: int = 0,
                 prefetch: int = 4, shift_labels: bool = False, device=None, device_prefetch: int = 2,
                 helper_thread: bool = True) -> None:
        self.documents = documents if isinstance(documents, TokenDataset) else TokenDataset(documents)
        for name, value, low in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} should be a positive integer, but got {name}={value!r}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window should be None or a positive integer, but got window={window!r}")
        if long_docs not in _LONG_DOCS:
            raise ValueError(f"long_docs should be one of {sorted(_LONG_DOCS)}, but got {long_docs!r}")
        if seed is not None and not is_seed(seed):
            raise ValueError(f"seed should be an integer in [0, 2**64), but got seed={seed!r}")
        if isinstance(pad_id, bool) or not isinstance(pad_id, int) or not -(2**63) <= pad_id < 2**63:
            raise ValueError(f"pad_id should be an int64 integer, but got pad_id={pad_id!r}")
        if seq_len * batch_size >= 2**31:
            raise ValueError(f"batch_size * seq_len = {seq_len * batch_size} tokens per batch; cu_seqlens is int32, "
                             "so a batch must hold fewer than 2**31 tokens")
        check_count("world_size", world_size, 1)
        check_count("rank", rank, 0)
        check_count("num_threads", num_threads, 0)
        check_count("prefetch", prefetch, 1)
        self.num_threads, self.prefetch = num_threads, prefetch
        self.helper_thread = bool(helper_thread)
        check_count("device_prefetch", device_prefetch, 1)
        self._device = _cuda.resolve_device(device)  # None: batches stay on the CPU
        self.device, self.device_prefetch = device, device_prefetch
        self.seq_len, self.batch_size = seq_len, batch_size
        self.shuffle, self.seed, self.window, self.long_docs = bool(shuffle), seed, window, long_docs
        self.pad_id, self.drop_last, self.return_doc_ids = pad_id, bool(drop_last), bool(return_doc_ids)
        self.shift_labels = bool(shift_labels)
        self.generator, self.rank, self.world_size = generator, rank, world_size
        self._epoch = 0
        self._seed: int | None = None
        self._plans: dict[tuple, _EpochPlan] = {}  # the newest plans asked for, oldest first
        self._ahead: _PlanAhead | None = None  # the next epoch's plan, being built
        self._cursor: Cursor | None = None  # the newest iterator's position
        self._resume: tuple[int, int] | None = None

    # -- sharding, seeds and plans -----------------------------------------------------------------------------

    def _shard(self) -> tuple[int, int]:
        return resolve_shard(self.rank, self.world_size)

    def _resolve_seed(self) -> int:
        if self.seed is not None:
            return self.seed
        if self._seed is None:
            if self._shard()[1] > 1:
                self._seed = 0  # every rank must pack alike
            else:
                drawn = torch.empty((), dtype=torch.int64).random_(generator=self.generator).item()
                self._seed = int(drawn) & SEED_MASK
        return self._seed

    def _plan_key(self, epoch: int) -> tuple:
        """What an epoch's plan is a pure function of (besides the documents)."""
        rank, world = self._shard()
        return (self._resolve_seed(), epoch, rank, world, self.seq_len, self.window, self.long_docs, self.shuffle,
                self.drop_last, len(self.documents))

    def _plan(self, epoch: int) -> _EpochPlan:
        """This rank's plan of ``epoch`` and the rows it serves: from the cache (the newest two asked for), from
        the plan built ahead in the background, or built here."""
        key = self._plan_key(epoch)
        ep = self._plans.get(key)
        if ep is None:
            if self._ahead is not None and self._ahead.key == key:
                ep, self._ahead = self._ahead.take(), None
            if ep is None:
                ep = _make_plan(self.documents._source, key)
            self._plans[key] = ep
            while len(self._plans) > 2:
                del self._plans[next(iter(self._plans))]
        return ep

    def _plan_ahead(self, epoch: int) -> None:
        """Starts building ``epoch``'s plan on a thread of its own (the planner runs without the GIL), so that
        the next epoch's first batch does not wait for its packing: an epoch's plan depends only on the
        settings, (seed, epoch) and the shard, so building it early changes nothing that is served."""
        key = self._plan_key(epoch)
        if key in self._plans or (self._ahead is not None and self._ahead.key == key):
            return
        self._ahead = _PlanAhead(self.documents._source, key)

    def _num_batches(self, rows: int) -> int:
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def __len__(self) -> int:
        """Batches in the epoch the next iterator serves (packing decides the row count)."""
        return self._num_batches(len(self._plan(self._epoch).rows))

    def set_epoch(self, epoch: int) -> None:
        """Makes the next iterator serve epoch ``epoch``."""
        epoch = operator.index(epoch)
        if epoch < 0:
            raise ValueError(f"epoch should be a non-negative integer, but got epoch={epoch}")
        self._epoch = epoch
        self._cursor = None

    def stats(self) -> dict[str, Any]:
        """Packing figures of this rank in the epoch of the newest iterator (before any, or after set_epoch or
        load_state_dict: the epoch the next iterator serves): its documents, tokens, rows (of its plan),
        ``efficiency`` (tokens over rows x seq_len), documents split or dropped, tokens dropped (by
        ``long_docs``), and the largest delay in rows a document waited in the window; then what it serves:
        ``shard_rows`` (the planned rows of every rank, rank by rank), ``rows_served`` (rows it yields this
        epoch), ``padding_rows`` (rows of padding only among them, to match the rank with the most rows),
        and ``rows_cut``/``tokens_cut`` (with ``drop_last``: planned rows and their tokens not served, to
        match the rank with the fewest rows and to drop the last partial batch)."""
        ep = self._plan(self._cursor.epoch if self._cursor is not None else self._epoch)
        plan = ep.plan
        out = plan.stats()
        out["epoch"] = ep.key[1]
        out["seq_len"] = self.seq_len
        out["efficiency"] = out["tokens"] / (out["rows"] * self.seq_len) if out["rows"] else 1.0
        out["rank"], out["world_size"] = ep.key[2], ep.key[3]
        out["shard_rows"] = [int(c) for c in ep.counts]
        served = ep.rows[:self._num_batches(len(ep.rows)) * self.batch_size]
        padding = int((served == _PADDING_ROW).sum())
        real = len(served) - padding  # the plan's first `real` rows
        out["rows_served"] = len(served)
        out["padding_rows"] = padding
        out["rows_cut"] = plan.num_rows - real
        out["tokens_cut"] = plan.tokens_in_rows(real, plan.num_rows)
        return out

    # -- iteration -----------------------------------------------------------------------------------------------

    def __iter__(self):
        epoch = self._epoch
        self._epoch += 1
        start = 0
        if self._resume is not None:
            if self._resume[0] == epoch:
                start = self._resume[1]
            self._resume = None
        cursor = Cursor(epoch, start)
        self._cursor = cursor
        self._device = _cuda.current_target(self._device, self.device)
        ep = self._plan(epoch)
        self._plan_ahead(epoch + 1)
        it = _PackedIterator(self, ep.plan, ep.rows, cursor)
        if self._device is None:
            return it
        return _device.stage(it, self._device, self.device_prefetch, cursor, None)

    # -- resumption ----------------------------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        rank, world = self._shard()
        return {"num_documents": len(self.documents), "num_tokens": self.documents.num_tokens,
                "seq_len": self.seq_len, "batch_size": self.batch_size, "window": self.window,
                "long_docs": self.long_docs, "shuffle": self.shuffle, "drop_last": self.drop_last,
                "shift_labels": self.shift_labels,
                "rank": rank, "world_size": world}

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands (seed, epoch, batches served, and the settings it must be loaded into),
        as plain values. An epoch's plan is a pure function of (seed, epoch), so the position is all the
        packing state there is: loading it replans the epoch (milliseconds) and replays nothing."""
        cursor = self._cursor
        if cursor is not None and not cursor.finished:
            epoch, served = cursor.epoch, cursor.consumed()[0]
        elif self._resume is not None and self._resume[0] == self._epoch:
            epoch, served = self._resume
        else:
            epoch, served = self._epoch, 0
        seed = self.seed if self.seed is not None else self._seed
        return {"format": STATE_FORMAT, **self._settings(), "seed": seed, "epoch": epoch, "batches_served": served}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continues from ``state``: the next iterator serves the rest of its epoch, and later epochs follow
        as in the run that saved it. Raises ``ValueError`` for a state of other documents or settings."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"load_state_dict expects a state from stoker.PackedLoader.state_dict() "
                             f"(format {STATE_FORMAT!r}); got {found!r}")
        for key, value in self._settings().items():
            if key not in state:
                raise ValueError(f"the state lacks {key!r}")
            if state[key] != value:
                raise ValueError(f"the state was saved with {key}={state[key]!r}; this loader has {key}={value!r}")
        seed, epoch, served = state.get("seed"), state.get("epoch"), state.get("batches_served")
        if seed is not None and not is_seed(seed):
            raise ValueError(f"the state's seed must be an integer in [0, 2**64) or None, got {seed!r}")
        if self.seed is not None and seed is not None and seed != self.seed:
            raise ValueError(f"the state was saved with seed={seed}; this loader was built with seed={self.seed}")
        for name, value in (("epoch", epoch), ("batches_served", served)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"the state's {name} must be a non-negative integer, got {value!r}")
        kept = self._seed
        if self.seed is None:
            self._seed = seed
        try:
            batches = self._num_batches(len(self._plan(epoch).rows)) if seed is not None else None
            if batches is not None and served > batches:
                raise ValueError(f"the state has served {served} batches of an epoch of {batches}")
        except BaseException:
            self._seed = kept  # a state refused leaves the loader as it was
            raise
        self._epoch = epoch
        self._resume = (epoch, served)
        self._cursor = None


_PADDING_ROW = -1  # a row id the materialiser writes as a row of padding only


class _EpochPlan(NamedTuple):
    key: tuple  # PackedLoader._plan_key: (seed, epoch, rank, world_size, then the settings)
    plan: Any  # this rank's core.PackPlan
    counts: np.ndarray  # the row count of every rank's plan
    rows: np.ndarray  # the plan rows this rank serves, in order, _PADDING_ROW for a row of padding


def _make_plan(source, key: tuple) -> _EpochPlan:
    seed, epoch, rank, world, seq_len, window, long_docs, shuffle, drop_last, n = key
    if shuffle and n > 0:
        order = core.IndexStream(n, n, False, True, seed, epoch).batch(0)
    else:
        order = np.arange(n, dtype=np.int64)
    args = (source, order, seq_len, window or 0, _LONG_DOCS[long_docs])
    plan = core.plan_packing(*args, shuffle, seed, epoch, rank, world)
    # every rank plans every shard (about as long as planning the dataset once) to learn their row counts
    counts = core.packing_shard_rows(*args, world) if world > 1 else np.array([plan.num_rows], np.int64)
    return _EpochPlan(key, plan, counts, _shard_rows(plan.num_rows, counts, drop_last))


class _PlanAhead:
    """An epoch's plan built on a thread of its own. Taken once; a plan that failed, or whose thread did not
    survive a fork, is built again by the caller (so an error is raised where the plan is asked for)."""

    def __init__(self, source, key: tuple) -> None:
        self.key = key
        self._pid = os.getpid()
        self._result: _EpochPlan | None = None
        self._avoid = core.current_cpu()  # the core of the thread that will build the batches
        self.running = True  # read without a lock: a stale True only costs a batch built without the helper
        self._thread = threading.Thread(target=self._run, args=(source,), name="stoker_plan_ahead")
        self._thread.start()

    def _run(self, source) -> None:
        _leave_core(self._avoid)
        try:
            self._result = _make_plan(source, self.key)
        except BaseException:  # built again, and raised, where it is asked for
            self._result = None
        finally:
            self.running = False

    def take(self) -> _EpochPlan | None:
        if os.getpid() != self._pid:
            return None
        self._thread.join()
        return self._result


def _shard_rows(own: int, counts: np.ndarray, drop_last: bool) -> np.ndarray:
    """The rows a rank with ``own`` planned rows serves when the ranks planned ``counts``: its first
    ``min(counts)`` rows with ``drop_last``, else all of them with rows of padding spread evenly among them up
    to ``max(counts)`` (position i is a real row when floor((i + 1) own / max) > floor(i own / max), so the
    last row is real and any batch_size consecutive rows hold at least floor(batch_size own / max) of them).

    For ranks planning 5 and 3 rows: rank 1 serves ``[pad, 0, pad, 1, 2]``; with drop_last both serve 3."""
    if drop_last:
        return np.arange(int(counts.min()), dtype=np.int64)
    most = int(counts.max())
    if own == most:
        return np.arange(most, dtype=np.int64)
    i = np.arange(most, dtype=np.int64)
    real = (i + 1) * own // most > i * own // most
    rows = np.full(most, _PADDING_ROW, dtype=np.int64)
    rows[real] = np.arange(own, dtype=np.int64)
    return rows


class _PackedIterator:
    """One epoch of packed batches, built on demand, or with threads by a native pipeline that builds the
    next `prefetch` batches ahead (any batch of the plan can be built on its own, so they are built in
    parallel and handed over in order)."""

    def __init__(self, loader: PackedLoader, plan, rows: np.ndarray, cursor: Cursor) -> None:
        self._turns = Turns()
        self._loader, self._plan, self._rows, self._cursor = loader, plan, rows, cursor
        self._num_batches = loader._num_batches(len(rows))
        self._next_batch = cursor.served
        pinned = _cuda.pinned_pool_for(loader._device, False)
        self._pool = POOL if pinned is None else pinned  # page-locked when batches go to a GPU
        self._pool.forget_peak()  # its cache follows the bytes out at once since this iterator began
        self._source = loader.documents._source
        self._options = (loader.pad_id, loader.return_doc_ids, loader.shift_labels, self._pool)
        self._pipe = None
        self._helper = None  # with batches built on demand: the thread writing rows from the other end
        self._pid = os.getpid()
        self._forked = False  # set in a forked child (its copy has neither the helper nor the builders)
        if loader.num_threads == 0 and loader.helper_thread and self._next_batch < self._num_batches \
                and _usable_cpus() > 1:
            self._helper = core.RowHelper()
            _live_packed.add(self)
        if loader.num_threads > 0 and self._next_batch < self._num_batches:
            self._pipe = core.PackPipeline(plan, self._source, rows, loader.batch_size, *self._options[:3],
                                           self._next_batch, self._num_batches, self._pool, loader.num_threads,
                                           loader.prefetch)
            _live_packed.add(self)

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return self._num_batches

    def _build(self, b: int):
        bs = self._loader.batch_size
        helper = self._helper
        ahead = self._loader._ahead
        if helper is not None and ((ahead is not None and ahead.running) or self._forked):
            # While the next epoch is planned, the planner has the other core: a helper sharing it would be
            # preempted in the middle of a row, which this thread would then wait for.
            helper = None
        rows = self._rows
        # With the helper, the next batch is begun before this one is handed over: the helper writes its
        # rows while this thread makes tensors of this one and the caller's loop runs.
        after = rows[(b + 1) * bs:(b + 2) * bs] if helper is not None and b + 1 < self._num_batches else None
        return core.materialize_packed(self._plan, self._source, rows[b * bs:(b + 1) * bs], *self._options,
                                       helper, after)

    @one_at_a_time
    def __next__(self) -> dict[str, Any]:
        b = self._next_batch
        if b >= self._num_batches:
            self._cursor.finished = True
            self._close()
            raise StopIteration
        if self._pipe is not None:
            if self._forked:
                raise RuntimeError(
                    f"this stoker iterator was created in process {self._pid}; its packing threads do not exist "
                    f"in process {os.getpid()} (a fork). Create a new iterator (iter(loader)) in this process.")
            try:
                built = self._pipe.next()
            except BaseException:
                self._close()  # from here on batches are built on demand: this one raises again if asked again
                raise
            if built is None:
                raise RuntimeError(f"the packing threads stopped before batch {b} of {self._num_batches}")
        else:
            built = self._build(b)
        self._next_batch = b + 1
        self._cursor.served += 1
        ids, labels, positions, cu, seq_idx, doc_ids, max_length = built
        cu = from_dlpack(cu)
        batch = {"input_ids": from_dlpack(ids), "labels": from_dlpack(labels), "position_ids": from_dlpack(positions),
                 "cu_seqlens": cu, "seq_idx": from_dlpack(seq_idx)}
        if doc_ids is not None:
            batch["doc_ids"] = from_dlpack(doc_ids)
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
        batch["max_length_q"] = batch["max_length_k"] = max_length
        return batch

    def close(self) -> None:
        """Stops building ahead (batches built and not taken are dropped); idempotent. From another thread than
        one in next(), once that next() has ended."""
        close_in_turn(self)

    def _close(self) -> None:
        pipe, self._pipe = self._pipe, None
        helper, self._helper = self._helper, None
        if not self._forked:  # in a forked child there are no threads to stop
            if pipe is not None:
                pipe.stop()
            if helper is not None:
                helper.stop()

    def __del__(self) -> None:
        self.close()


_live_packed: weakref.WeakSet = weakref.WeakSet()


def _leave_core(cpu: int) -> None:
    """Moves the calling thread off core `cpu` where it may use others (Linux): a thread started by another is
    often queued on its core, and on a 2-core VM shared it for tens of milliseconds while the other idled."""
    try:
        allowed = os.sched_getaffinity(0)
        if cpu in allowed and len(allowed) > 1:
            os.sched_setaffinity(0, allowed - {cpu})
    except (AttributeError, OSError):  # not on Linux
        pass


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _mark_forked() -> None:
    for it in list(_live_packed):
        it._forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_mark_forked)


@atexit.register
def _close_live_packed() -> None:
    # Threads reading the token files must stop before the interpreter frees them; only weak references here.
    exiting()  # (a next() blocked in a daemon thread is not waited for)
    for it in list(_live_packed):
        it.close()

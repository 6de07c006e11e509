"""Iterator lifecycle across processes and at interpreter exit: clear errors, never a hang."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import stoker


class Squares(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        return np.full(3, i * i)


@pytest.mark.parametrize("dataset", [TensorDataset(torch.arange(64.0)), Squares()], ids=["array", "python"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterator_used_in_forked_child_raises_instead_of_hanging(dataset, num_workers):
    it = iter(stoker.DataLoader(dataset, batch_size=8, num_workers=num_workers))
    first = next(it)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report what next() did, then leave without running the parent's exit hooks
        try:
            next(it)
            message = b"no error"
        except RuntimeError as exc:
            message = str(exc).encode()
        os.write(write, message[:1000])
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    message = os.read(read, 1000).decode()
    os.close(read)
    assert os.WEXITSTATUS(status) == 0
    assert "created in process" in message and "iter(loader)" in message
    rest = list(it)  # the parent's iterator is unaffected
    expected = list(torch.utils.data.DataLoader(dataset, batch_size=8))
    for got, want in zip([first, *rest], expected, strict=True):
        assert torch.equal(torch.as_tensor(got[0] if isinstance(got, list) else got),
                           torch.as_tensor(want[0] if isinstance(want, list) else want))


def test_interpreter_exit_with_live_iterators_is_clean():
    code = textwrap.dedent("""
        import numpy as np, torch, stoker
        from torch.utils.data import TensorDataset
        x = np.random.rand(100_000, 64).astype(np.float32)
        its = [iter(stoker.DataLoader(TensorDataset(torch.from_numpy(x)), batch_size=32, shuffle=True,
                                      num_workers=2)) for _ in range(4)]
        for it in its:
            next(it)
        print("done")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done" and proc.stderr == ""


def test_interpreter_exit_while_daemon_threads_are_in_native_calls_is_clean():
    # A daemon thread coming back from a call that let go of the GIL once the interpreter finalizes is ended
    # by pthread_exit as it takes the GIL: the unwind must not meet a noexcept destructor (an abort, every run
    # before). Threads spinning on such a call are sure to be in one at exit.
    code = textwrap.dedent("""
        import threading, time
        from stoker import _core

        def spin():
            while True:
                _core.cuda_available()

        for _ in range(4):
            threading.Thread(target=spin, daemon=True).start()
        time.sleep(0.2)
        print("done")
    """)
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "done" and proc.stderr == ""


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_interpreter_exit_while_daemon_threads_wait_for_worker_batches_is_clean(mode):
    # Their next() is woken and ends before the interpreter stops them (within a quarter of a second with
    # worker processes); a worker thread in a sample that never returns is a daemon: exit does not wait for it.
    code = textwrap.dedent("""
        import threading, time, torch, stoker

        class Slow(torch.utils.data.Dataset):
            def __len__(self):
                return 100
            def __getitem__(self, i):
                if i >= 4:
                    threading.Event().wait()  # never set
                return torch.tensor([i])

        its = [iter(stoker.DataLoader(Slow(), batch_size=4, num_workers=1, worker_mode=MODE)) for _ in range(2)]
        for it in its:
            threading.Thread(target=lambda it=it: list(it), daemon=True).start()
        time.sleep(1.0)
        print("done")
    """).replace("MODE", repr(mode))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done" and proc.stderr == ""

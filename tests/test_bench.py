"""The benchmark runner, `python -m stoker bench`: its records and options, never its numbers."""

import importlib
import json
import subprocess
import sys

import pytest
import torch

import stoker
from stoker import _bench

THROUGHPUT = {"arrays", "mmap", "tiny", "large", "big", "crop", "png", "padding"}


def has(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def hide(monkeypatch, *modules: str) -> None:
    """Makes `import module` fail as if it were not installed."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_quick_run_writes_every_section_as_records(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "stoker", "bench", "--quick", "--scale", "0.002", "--rounds", "1", "--budget", "0.05",
         "--json", str(out)],
        capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert set(report) == {"date", "machine", "settings", "records", "skipped", "failed"}
    assert report["failed"] == []
    assert report["settings"] == {"scale": 0.002, "rounds": 1, "budget_s": 0.05, "quick": True, "only": None}
    assert report["machine"]["cpus"] >= 1 and report["machine"]["torch"]
    records, skipped = report["records"], {s["section"] for s in report["skipped"]}
    gpu = torch.cuda.is_available() and stoker.cuda_available()
    assert skipped == (set() if has("PIL.Image") else {"png"}) | (set() if gpu else {"gpu"})
    by_workload = {}
    for rec in records:
        by_workload.setdefault(rec["workload"], []).append(rec)
    # Every section of the runner left records (or said why it was skipped), and the progress went to stderr.
    # (the GPU section, where it runs, has four workloads: two batch sizes, the training loop, normalising)
    # (and the first-batch and memory sections a second each: spawned workers)
    assert len(by_workload) == len(_bench.SECTIONS) - len(skipped) + (3 if gpu else 0) + 2
    assert f"[{len(_bench.SECTIONS)}/{len(_bench.SECTIONS)}]" in proc.stderr
    assert "M samples/s" in proc.stdout

    throughput = [w for w, rows in by_workload.items() if "samples_per_s" in rows[0]]
    assert len(throughput) == len(THROUGHPUT - skipped)
    for w in throughput:
        rows = by_workload[w]
        torch_rows = [r for r in rows if r["loader"].startswith("torch ")]
        assert torch_rows and any(r["loader"].startswith("stoker") for r in rows)
        assert max(r["ratio_to_torch_best"] for r in torch_rows) == pytest.approx(1.0)
        assert all(r["samples_per_s"] > 0 and r["first_batch_ms"] > 0 for r in rows)
    python_workloads = [w for w in throughput if w.startswith(("Python dataset", "PNG"))]
    for w in python_workloads:
        loaders = {r["loader"] for r in by_workload[w]}
        assert {"torch num_workers=0", "torch num_workers=1 (persistent)", "torch num_workers=2 (persistent)",
                "stoker num_workers=0", "stoker num_workers=2 (processes, persistent)",
                "stoker num_workers=2 worker_mode=thread"} <= loaders
        assert any(name.startswith("torchdata nodes") for name in loaders) == has("torchdata.nodes")
    # Grain's and SPDL's columns, where they are installed, on the array and the Python-dataset workloads.
    for w in [w for w in throughput if w.startswith("arrays")] + python_workloads:
        loaders = {r["loader"] for r in by_workload[w]}
        assert any(name.startswith("grain ") for name in loaders) == has("grain.python")
        assert any(name.startswith("spdl ") for name in loaders) == has("spdl.dataloader")

    first = {r["loader"]: r for r in by_workload["first batch, num_workers=2"]}
    assert first["torch num_workers=2"]["ratio_to_torch"] == pytest.approx(1.0)
    assert first["stoker num_workers=2"]["first_batch_ms"] > 0
    later = {r["loader"]: r for r in by_workload["first batch of a later epoch, spawn, num_workers=2"]}
    assert set(later) == {"torch num_workers=2", "stoker num_workers=2"}
    assert later["torch num_workers=2"]["ratio_to_torch"] == pytest.approx(1.0)
    assert all(r["first_batch_ms"] > 0 for r in later.values())
    pss = {r["loader"]: r for r in by_workload["peak PSS, num_workers=2"]}
    assert {"torch num_workers=2", "stoker num_workers=2"} <= set(pss)
    # The other loaders sit in the first-batch and memory sections too, where they are installed (--quick leaves
    # Grain's DataLoader, which spawns its workers at every iter(), out of the first-batch one).
    for module, prefix in (("torchdata.nodes", "torchdata "), ("grain.python", "grain "), ("spdl.dataloader", "spdl ")):
        assert any(name.startswith(prefix) for name in first) == has(module)
        assert any(name.startswith(prefix) for name in pss) == has(module)
    assert all(r["first_batch_ms"] > 0 for r in first.values())
    for r in pss.values():
        assert r["peak_pss_mib"] >= r["idle_pss_mib"] > 0 and r["processes_at_peak"] >= 1
    assert pss["torch num_workers=2"]["ratio_to_torch"] == pytest.approx(1.0)
    spawned = {r["loader"]: r for r in by_workload["peak PSS, num_workers=2, spawn"]}
    assert set(spawned) == {"torch num_workers=2, spawn", "stoker num_workers=2, spawn"}
    assert spawned["torch num_workers=2, spawn"]["ratio_to_torch"] == pytest.approx(1.0)
    assert all(r["peak_pss_mib"] >= r["idle_pss_mib"] > 0 for r in spawned.values())

    memory = by_workload["peak RSS"]
    assert [r["loader"].split()[0] for r in memory] == ["torch", "stoker"]
    assert all(r["peak_rss_mib"] > 0 for r in memory)
    resume = {r["loader"].split()[0]: r["resume_ms"] for r in by_workload["resume"]}
    assert {"stoker", "torch"} <= set(resume) and all(v > 0 for v in resume.values())
    packing = {r["loader"]: r for r in by_workload["packing"]}
    assert any(name.startswith("stoker PackedLoader") for name in packing)
    assert all(r["tokens_per_s"] > 0 for r in packing.values())
    assert all(0.99 < r["efficiency"] <= 1 for r in packing.values() if "efficiency" in r)


def test_sections_run_in_their_own_processes_and_their_records_are_merged(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert _bench.main(["--only", "tiny,resume", "--scale", "0.002", "--rounds", "1", "--budget", "0.05",
                        "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {r["workload"].split(":")[0] for r in report["records"]} == {"tiny", "resume"}
    assert report["skipped"] == [] and report["failed"] == []
    captured = capsys.readouterr()
    assert "M samples/s" in captured.out and "load_state_dict()" in captured.out  # the children's tables
    assert "[1/2]" in captured.err and "[2/2]" in captured.err


def test_section_child_mode_needs_a_section_key():
    with pytest.raises(SystemExit) as exit_:
        _bench.main(["--section", "no such section"])
    assert exit_.value.code == 2


# Modules hidden in this process are hidden from the section run here (`--section`, the mode that the runner
# starts each section's process in), not from the processes that main() starts.
def test_png_workload_is_skipped_without_pillow(tmp_path, monkeypatch, capsys):
    hide(monkeypatch, "PIL", "PIL.Image")
    out = tmp_path / "bench.json"
    assert _bench.main(["--section", "png", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["records"] == []
    assert [s["section"] for s in report["skipped"]] == ["png"]
    assert "Pillow is not installed" in report["skipped"][0]["reason"]
    assert "skipped" in capsys.readouterr().out


def test_torchdata_column_is_skipped_without_torchdata(tmp_path, monkeypatch, capsys):
    hide(monkeypatch, "torchdata", "torchdata.nodes")
    out = tmp_path / "bench.json"
    assert _bench.main(["--section", "crop", "--scale", "0.002", "--rounds", "1", "--budget", "0.05",
                        "--json", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert records and not any("torchdata" in r["loader"] for r in records)
    assert "torchdata is not installed" in capsys.readouterr().out


@pytest.mark.parametrize("section", ["arrays", "crop", "first-batch", "pss"])
def test_grain_and_spdl_columns_are_skipped_without_them(tmp_path, monkeypatch, capsys, section):
    hide(monkeypatch, "grain", "grain.python", "spdl", "spdl.dataloader")
    out = tmp_path / "bench.json"
    assert _bench.main(["--section", section, "--scale", "0.002", "--rounds", "1", "--budget", "0.05",
                        "--json", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert any(r["loader"].startswith("stoker") for r in records)
    assert not any(r["loader"].startswith(("grain", "spdl")) for r in records)
    printed = capsys.readouterr().out
    assert "grain is not installed or does not import" in printed
    assert "spdl is not installed or does not import" in printed


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch, capsys):
    hide(monkeypatch, "matplotlib", "matplotlib.pyplot")
    assert _bench.main(["--only", "resume", "--plot", str(tmp_path / "ratios.png")]) == 2
    assert "stoker[plot]" in capsys.readouterr().err
    assert not (tmp_path / "ratios.png").exists()


def test_plot_draws_the_ratios(tmp_path):
    pytest.importorskip("matplotlib")
    records = [
        {"workload": "w", "loader": "torch num_workers=0", "ratio_to_torch_best": 1.0},
        {"workload": "w", "loader": "stoker num_workers=0", "ratio_to_torch_best": 2.5},
        {"workload": "first batch, num_workers=2", "loader": "stoker num_workers=2", "ratio_to_torch": 0.4},
        {"workload": "resume", "loader": "stoker", "resume_ms": 0.5},  # no ratio: left out of the chart
    ]
    _bench.plot(records, str(tmp_path / "ratios.png"))
    assert (tmp_path / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_selects_sections_by_key_or_title(capsys):
    assert [s.key for s in _bench.select("resume")] == ["resume"]
    assert [s.key for s in _bench.select("png, pss")] == ["png", "pss"]
    assert [s.key for s in _bench.select("Worker Processes")] == ["first-batch", "pss"]
    assert len(_bench.select(None)) == len(_bench.SECTIONS)
    assert _bench.main(["--only", "no such section"]) == 2
    assert "matches no section" in capsys.readouterr().err


def test_bench_usage_error():
    proc = subprocess.run([sys.executable, "-m", "stoker"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr

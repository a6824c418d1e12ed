"""The save benchmark runs end to end on CPU (a small state) and reports honestly."""

import json
import subprocess
import sys

import pytest

from tests.support import REPO


def test_save_bench_smoke_on_cpu(tmp_path):
    out = tmp_path / "bench"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.save_bench",
        "--device",
        "cpu",
        "--size-gb",
        "0.02",
        "--repeats",
        "2",
        "--threads",
        "2",
        "--rounds",
        "2",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    methods = results["methods"]
    assert {"torch.save", "dcp.save", "dcp.async_save", "distckpt sync", "distckpt async"} <= set(methods)
    for name, m in methods.items():
        assert len(m["rounds"]) == 2, name  # interleaved rounds, each a fresh process
        for r in m["rounds"]:
            assert r["bit_exact"] is True, name
            assert len(r["saves"]) == 2 and all(s["total"] >= s["stall"] > 0 for s in r["saves"]), name
            assert r["disk_ceiling_gbps"] > 0, name  # the ceiling of the same round, for the ratio
    ours = methods["distckpt async"]["rounds"][0]
    assert ours["staging_bytes"] >= ours["state_bytes"] and ours["restore_verified"] > 0
    assert ours["restore_cold"] > 0 and methods["dcp.save"]["rounds"][0]["restore_cold"] > 0  # files evicted first
    ceilings = results["ceilings"]
    assert ceilings["disk_read_gbps_t2"] > 0 and ceilings["page_cache_read_gbps_t2"] > 0
    lo, hi = ceilings["disk_write_fsync_gbps_range"]
    assert len(ceilings["rounds"]) == 2 and 0 < lo <= ceilings["disk_write_fsync_gbps"] <= hi
    assert ceilings["stage_gbps"] > 0
    assert "x disk ceiling" in proc.stdout and "first save's stall" in proc.stdout
    assert "cold restore >= 0.9x the disk's read ceiling" in proc.stdout
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best competitor" in proc.stdout and "distckpt async" in proc.stdout


def test_storage_bench_reports_gbps_for_every_backend(tmp_path):
    out = tmp_path / "storage"
    cmd = [sys.executable, "-m", "benchmarks.storage_bench", "--size-gb", "0.01", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    backends = json.loads((out / "storage.json").read_text())["backends"]
    assert set(backends) == {"local disk", "s3", "local tier + s3"}
    for name, r in backends.items():
        assert r["save_gbps"] > 0 and r["restore_gbps"] > 0, name
    assert backends["local tier + s3"]["upload_gbps"] > 0 and backends["local tier + s3"]["restore_remote_gbps"] > 0
    assert (out / "storage.png").read_bytes()[:4] == b"\x89PNG"


def test_the_cli_bench_command_runs_the_save_benchmark(tmp_path):
    out = tmp_path / "cli-bench"
    cmd = [sys.executable, "-m", "distckpt", "bench", "--size-gb", "0.01", "--repeats", "2"]
    cmd += ["--methods", "torch.save,distckpt async", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"torch.save", "distckpt async"}
    assert results["meta"]["device"] == "cpu"  # the CLI picks cpu where no GPU is present
    assert all(r["bit_exact"] for m in results["methods"].values() for r in m["rounds"])
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overlap_bench_measures_training_time_lost_per_save(tmp_path):
    out = tmp_path / "overlap"
    cmd = [sys.executable, "-m", "benchmarks.overlap_bench", "--size-gb", "0.05", "--rounds", "1",
           "--methods", "torch.save,dcp.async_save,distckpt async,distckpt async[overlap]",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((out / "overlap.json").read_text())
    summary = results["summary"]
    assert set(summary) == {"torch.save", "dcp.async_save", "distckpt async", "distckpt async[overlap]"}
    for name, s in summary.items():
        assert s["stall"] > 0 and s["durable"] >= s["stall"] and s["baseline"] > 0, name
        assert abs(s["lost"] - (s["stall"] + s["extra"])) < 1e-9, name
        assert 0 < s["first_stall"] <= s["first_save"], name  # the first save, right after construction
    assert summary["torch.save"]["extra"] == 0  # a synchronous save overlaps nothing: it all stalls
    assert (out / "overlap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "less training time than dcp.async_save" in proc.stdout
    assert "first save right after construction" in proc.stdout


def test_tensors_bench_times_many_small_tensors_against_torch_save(tmp_path):
    out = tmp_path / "tensors"
    cmd = [sys.executable, "-m", "benchmarks.tensors_bench", "--counts", "200,800", "--rounds", "1", "--saves", "2",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((out / "tensors.json").read_text())
    for count in ("200", "800"):
        summary = results["summary"][count]
        assert set(summary) == {"torch.save", "dcp.save", "dcp.async_save", "distckpt sync", "distckpt async"}
        for name, s in summary.items():
            assert s["bit_exact"] and s["rounds"] == 1 and s["save"] > 0 and s["restore"] > 0, name
            assert 0 < s["stall"] <= s["save"], name  # a background save blocks training for part of it
        assert summary["torch.save"]["save_x"] == 1.0  # the ratios are to torch.save of the same round
        sync = summary["distckpt sync"]
        assert sync["stall"] == pytest.approx(sync["save"], rel=0.5)  # a synchronous save blocks throughout
    assert "cost per tensor at 800 vs 200 tensors" in proc.stdout
    assert (out / "tensors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_restore_bench_counts_what_storage_served_per_number_of_ranks(tmp_path):
    out = tmp_path / "restore"
    cmd = [sys.executable, "-m", "benchmarks.restore_bench", "--size-gb", "0.01", "--ranks", "1,2", "--no-s3",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    runs = json.loads((out / "restore.json").read_text())["runs"]
    assert {(r["mode"], r["method"], r["ranks"]) for r in runs} == {
        (m, w, k) for m in ("chief", "sharded") for w in ("distckpt", "dcp.load") for k in (1, 2)
    }
    for r in runs:
        assert r["bit_exact"] and r["seconds"] > 0 and r["served_bytes"] > 0, r
    dcp2 = [r for r in runs if r["method"] == "dcp.load" and r["ranks"] == 2]
    assert all(r["served_x"] > 1.8 for r in dcp2)  # the reference reads once per rank: the count sees it
    assert (out / "restore.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_warm_restore_bench_interleaves_restores_with_dcp_load_and_the_read_ceiling(tmp_path):
    out = tmp_path / "warm"
    cmd = [sys.executable, "-m", "benchmarks.warm_restore_bench", "--size-gb", "0.02", "--rounds", "3", "--cold",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((out / "warm_restore.json").read_text())
    assert results["bit_exact"] is True
    methods = ["read ceiling", "distckpt", "distckpt verified", "dcp.load"]
    methods += ["read ceiling, cold", "distckpt verified, cold", "dcp.load, cold"]  # --cold: evicted first
    assert results["methods"] == methods and set(results["times"]) == set(methods) == set(results["first"])
    assert all(len(results["times"][m]) == 3 and min(results["times"][m]) > 0 for m in methods)
    assert (
        "warm restore >= 5x faster than dcp.load" in proc.stdout and "read ceiling / distckpt, per round" in proc.stdout
    )
    assert "cold restore (verified) >= 0.9x the read ceiling from the disk" in proc.stdout
    assert (out / "warm_restore.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "work").exists()  # the checkpoints are removed


@pytest.mark.timeout(400)
def test_frameworks_bench_compares_each_framework_default_with_distckpt(tmp_path):
    out = tmp_path / "fw"
    cmd = [sys.executable, "-m", "benchmarks.frameworks_bench", "--size-mb", "8", "--rounds", "1", "--saves", "1",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=380, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    summary = json.loads((out / "frameworks.json").read_text())["summary"]
    expected = {f"{fw}:{m}" for fw, ms in {"lightning": ("TorchCheckpointIO", "AsyncCheckpointIO", "distckpt"),
                "accelerate": ("Accelerator", "distckpt"), "transformers": ("Trainer", "distckpt")}.items() for m in ms}  # fmt: skip
    assert set(summary) == expected
    for name, s in summary.items():
        assert "error" not in s, (name, s)
        assert 0 < s["stall_s"] <= s["durable_s"]
    assert summary["lightning:distckpt"]["stall_vs_default"] > 0
    assert (out / "frameworks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_bench_reports_protection_and_recovery_reading_nothing_from_s3(tmp_path):
    out = tmp_path / "memory"
    cmd = [sys.executable, "-m", "benchmarks.memory_bench", "--size-mb", "8", "--rounds", "1", "--saves", "1",
           "--mem", str(tmp_path / "mem"), "--out", str(out)]  # fmt: skip
    (tmp_path / "mem").mkdir()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    s = json.loads((out / "memory.json").read_text())["summary"]
    assert s["bit_exact"] is True and s["recovery_tier"] == ["local+replica"]
    assert s["recovery_s3_get_bytes"] < 1000 < s["checkpoint_bytes"] <= s["s3_restore_get_bytes"]  # only the lease
    assert 0 < s["recovery_s"] <= s["recovery_protected_again_s"] and s["save_protected_s"] > 0
    assert "target >= 5x" in proc.stdout and (out / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

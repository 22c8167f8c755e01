"""CPU smoke tests of the benchmark scripts (issue 5): they run end to end on a
small config and write the JSON the results tables are built from. Not timed
assertions: only that every mode ran and the derived columns are consistent."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from nrrdd.data import DEBIAN_FASHION_MNIST as FASHION

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script, *args, tmp_path):
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, str(BENCH / script), *args, "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text()), proc.stdout


def test_bench_refine_cpu_smoke(tmp_path):
    data, stdout = _run("bench_refine.py", "--device", "cpu", "--config", "convnet3-28",
                        "--batch", "4", "--iters", "1", tmp_path=tmp_path)
    rows = {r["mode"]: r for r in data["rows"]}
    assert set(rows) == {"reference", "fused", "fast", "floor", "fast-floor"}
    for r in rows.values():
        assert math.isfinite(r["ms"]) and r["ms"] > 0
        assert r["peak_RSS_GiB"] > 0
        assert r["x_reference"] == pytest.approx(r["ms"] / rows["reference"]["ms"], rel=1e-2, abs=1e-3)
        assert r["x_floor"] == pytest.approx(r["ms"] / rows["floor"]["ms"], rel=1e-2, abs=1e-3)
    assert rows["reference"]["x_reference"] == 1.0
    for r in rows.values():
        assert r["s_per_image"] == pytest.approx(r["ms"] * 2000 / 4 / 1000, rel=1e-2, abs=1e-4)
    assert "| convnet3-28 | fused" in stdout


def test_bench_student_cpu_smoke(tmp_path):
    data, stdout = _run("bench_student.py", "--device", "cpu", "--config", "convnet3-28", "--ipc", "1",
                        "--epochs", "1", "--repeats", "1", tmp_path=tmp_path)
    rows = {r["mode"]: r for r in data["rows"]}
    assert set(rows) == {"fp32", "channels_last", "bf16", "bf16+channels_last"}
    for r in rows.values():
        assert r["images"] == 10 and math.isfinite(r["ms_per_epoch"]) and r["ms_per_epoch"] > 0
        assert r["x_fp32"] == pytest.approx(r["ms_per_epoch"] / rows["fp32"]["ms_per_epoch"], rel=1e-2, abs=1e-2)
        assert r["s_per_student"] == pytest.approx(r["ms_per_epoch"] * 300 / 1000, rel=1e-2, abs=0.1)
    assert data["meta"]["batch"] == 100 and "| convnet3-28 | channels_last" in stdout


def test_bench_ops_cpu_smoke(tmp_path):
    prof = tmp_path / "profile.txt"
    data, _ = _run("bench_ops.py", "--device", "cpu", "--quick", "--iters", "2", "--profile", str(prof),
                   tmp_path=tmp_path)
    # one profiler table per fused op, naming the op the benchmark timed
    titles = [line for line in prof.read_text().splitlines() if line.startswith("## ")]
    assert titles == [f"## {r['op']} {r['shape']} (fused) (5 iterations)" for r in data["rows"]]
    assert "nrrdd::masked_adam_step" in prof.read_text()
    ops = [r["op"] for r in data["rows"]]
    assert ops == ["masked_refine_step", "bn_stat_loss fwd+bwd", "dbr_loss fwd+bwd"]
    for r in data["rows"]:
        assert r["fused_ms"] > 0 and r["composite_ms"] > 0
        assert r["speedup"] == pytest.approx(r["composite_ms"] / r["fused_ms"], rel=2e-2)
        assert r["fused_GBps"] == pytest.approx(r["bytes"] / (r["fused_ms"] * 1e-3) / 1e9, rel=2e-2, abs=0.1)
    assert data["meta"]["copy_GBps"] > 0


def test_plot_loss_curves_averages_batches(tmp_path):
    for name, base in (("fast", 1.0), ("plain", 2.0)):
        d = tmp_path / name
        d.mkdir()
        lines = [json.dumps({"batch": b, "iteration": it, "total": base + b + it / 100})
                 for b in (0, 1) for it in (100, 200)]
        (d / "log.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, str(BENCH / "plot_loss_curves.py"), str(tmp_path / "fast"),
                           str(tmp_path / "plain"), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "fast: first 2.5000, last 3.5000 (2 points)" in proc.stdout  # mean of batches 0 and 1
    assert "plain: first 3.5000, last 4.5000" in proc.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"




@pytest.mark.skipif(not any(FASHION.glob("train-images-idx3-ubyte*")),
                    reason=f"real Fashion-MNIST not installed at {FASHION} (Debian package dataset-fashion-mnist)")
def test_device_check_rehearsal(tmp_path):
    """benchmarks/device_check.sh, the one script a GPU session runs, rehearsed on the CPU
    (NRRDD_REHEARSAL=1: real Fashion-MNIST cut to 50 + 10 images per class, toy budgets):
    a teacher, then the fastcheck's --fast and --no-fast runs side by side. Its summary's
    numbers are the runs' own, its extras archive holds them, and its scratch files stay
    in NRRDD_WORK."""
    import os
    import re
    import tarfile

    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, OUT=str(out), NRRDD_WORK=str(work), NRRDD_REHEARSAL="1", NRRDD_DATA=str(FASHION),
               NRRDD_DEVICE_STAGES="teachers fastcheck", NRRDD_TEACHERS="convnet3:1:flip",
               NRRDD_FAST_ARCHS="convnet3", NRRDD_FAST_PARALLEL="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(["bash", str(BENCH / "device_check.sh")], cwd=BENCH.parent, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = (out / "summary.txt").read_text()
    assert re.search(r"teacher convnet3 \(1 epochs asked\): test accuracy 0\.\d+", summary), summary
    assert (work / "teacher_convnet3.pt").is_file()
    with tarfile.open(out / "extras.tar.gz") as tar:
        runs = {path: json.load(tar.extractfile(f"extras/fastcheck/convnet3-{path}/run.json"))
                for path in ("fast", "no-fast")}
    for path, run in runs.items():
        top1 = run["top1"]["soft"]
        assert len(top1) == 3 and all(0 <= v <= 100 for v in top1)
        assert all(abs(v - round(v)) < 1e-9 for v in top1)  # 100 test images: whole percents
        assert f"fastcheck convnet3 --{path} seed 0: {top1} mean" in summary
    assert runs["fast"]["fast"] is True and runs["no-fast"]["fast"] is False

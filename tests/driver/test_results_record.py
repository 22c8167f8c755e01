"""benchmarks/results_record.py: the committed CSV of the study's students, its merge,
its pooling over distillations, and the record docs/RESULTS.md is drawn from."""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import results_record as rr  # noqa: E402

RECORD = ROOT / "docs" / "results" / "fashion_mnist_students.csv"
T = "convnet3 0.9224"


def _students(g, n):
    return [round(float(v), 2) for v in 40 + 50 * torch.rand(n, generator=g, dtype=torch.float64)]


def test_pooled_equals_the_statistics_of_every_student():
    """Pooling distillations from their (count, mean, std) alone gives the mean and the
    population std of all their students together."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    draws = [_students(g, n) for n in (3, 5, 1, 4)]
    rows = [rr.from_values(10, "nrr", "soft", d, v, "2026-11-30", T) for d, v in enumerate(draws)]
    rows.append(rr.from_values(10, "nrr", "dbr", 0, _students(g, 3), "2026-11-30", T))  # another mode: not pooled
    rows.append(rr.from_values(1, "nrr", "soft", 0, _students(g, 2), "2026-11-30", T))  # another IPC
    every = [v for d in draws for v in d]
    c = rr.pooled(rows)[(10, "nrr")]
    assert c["students"] == 13 and c["distillations"] == 4
    assert c["mean"] == pytest.approx(statistics.fmean(every), abs=1e-9)
    assert c["std"] == pytest.approx(statistics.pstdev(every), abs=1e-9)
    assert rr.pooled(rows, "dbr")[(10, "nrr")]["students"] == 3


def test_merge_replaces_its_key_and_keeps_the_rest(tmp_path):
    g = torch.Generator().manual_seed(7)
    f = tmp_path / "rec.csv"
    a = rr.from_values(10, "cidd", "soft", 0, _students(g, 3), "2026-11-29", T)
    b = rr.from_values(10, "cidd", "soft", 1, _students(g, 3), "2026-11-29", T)
    assert rr.merge(f, [a, b]) == (2, 0)
    a2 = rr.from_values(10, "cidd", "soft", 0, _students(g, 4), "2026-11-30", T)
    assert rr.merge(f, [a2]) == (0, 1)
    rows = {r["distillation"]: r for r in rr.read(f)}
    assert len(rows) == 2 and rows[0]["top1"] == a2["top1"] and rows[0]["measured"] == "2026-11-30"
    assert rows[1]["top1"] == b["top1"] and rows[1]["mean"] == pytest.approx(b["mean"], abs=0.005)
    assert not f.with_name(f.name + ".tmp").exists()
    # rows are written in the paper's order, a method at a setting under its method
    more = [rr.from_values(10, m, "soft", 0, _students(g, 2), "2026-11-30", T)
            for m in ("nrr@cam_eps=0.3", "sre2l-nolr", "nrr", "random")]
    rr.merge(f, more)
    assert [r["method"] for r in rr.read(f)] == ["random", "cidd", "cidd", "nrr", "nrr@cam_eps=0.3", "sre2l-nolr"]


def test_another_teachers_rows_are_refused(tmp_path):
    """One record, one teacher: a study with another teacher (the GPU's 93.02% ConvNet-3)
    cannot replace this one's rows; nothing is written."""
    f = tmp_path / "rec.csv"
    rr.merge(f, [rr.from_values(10, "nrr", "soft", 0, [72.0, 73.0], "2026-11-30", T)])
    before = f.read_text()
    other = rr.from_values(10, "nrr", "soft", 0, [75.0, 76.0], "2026-12-01", rr.teacher_name("convnet3", 0.9302))
    with pytest.raises(ValueError, match="convnet3 0.9224, convnet3 0.9302"):
        rr.merge(f, [other])
    assert f.read_text() == before
    assert rr.teacher_name("resnet18", None) == "resnet18 unknown"


def test_inconsistent_rows_are_refused_with_their_line(tmp_path):
    f = tmp_path / "rec.csv"
    rr.merge(f, [rr.from_values(1, "rded", "soft", 0, [50.0, 52.0], "2026-11-30", T)])
    text = f.read_text()
    assert "1,rded,soft,0,2,51.00,1.00,50 52,2026-11-30,convnet3 0.9224" in text
    f.write_text(text.replace("51.00", "55.00"))  # the mean no longer that of the values
    with pytest.raises(ValueError, match=r"rec\.csv:2: top1 .* has mean 51\.000"):
        rr.read(f)
    f.write_text(text.replace(",2,51.00", ",3,51.00"))
    with pytest.raises(ValueError, match="2 values in top1 but students = 3"):
        rr.read(f)
    f.write_text(text.replace(",1.00,", ",-1.00,"))
    with pytest.raises(ValueError, match="std >= 0"):
        rr.read(f)
    f.write_text(text.replace("ipc,", "IPC,"))
    with pytest.raises(ValueError, match="no column ipc"):
        rr.read(f)
    with pytest.raises(ValueError, match="no students"):
        rr.from_values(1, "rded", "soft", 0, [], "2026-11-30", T)


def test_the_committed_record(tmp_path):
    """docs/results/fashion_mnist_students.csv parses, every row agrees with itself, it
    holds the cells docs/RESULTS.md pools (three distillations of every IPC-1 method's
    soft labels), and the top-1-against-IPC figure draws from it."""
    rows = rr.read(RECORD)
    keys = [(r["ipc"], r["method"], r["labels"], r["distillation"]) for r in rows]
    assert len(keys) == len(set(keys))
    cells = rr.pooled(rows)
    for method in ("random", "rded", "cidd", "sre2l", "nrr", "nrr-nolr"):
        assert cells[(1, method)]["distillations"] == 3
    assert rr.main([str(RECORD), "--figure", str(tmp_path / "acc.png")]) == 0
    from PIL import Image

    with Image.open(tmp_path / "acc.png") as im:
        assert im.format == "PNG" and im.size == (720, 440)

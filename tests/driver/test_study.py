"""benchmarks/fashion_mnist_study.py on a Fashion-MNIST-shaped toy: every run, the table,
the orderings, a holdout sweep, a cross-architecture student, the figure."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from nrrdd_tiny import make_teacher

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import fashion_mnist_study as study  # noqa: E402


@pytest.fixture(scope="module")
def done(idx_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    teacher = make_teacher(root / "teacher.pt", num_classes=10, image_size=12, dataset="fashion-mnist")
    out = root / "out"
    rc = study.main(["--teacher", str(teacher), "--out", str(out), "--data-dir", str(idx_dir), "--ipc", "1",
                     "--method", "random", "--method", "cidd", "--labels", "soft,onehot,dbr", "--seeds", "2",
                     "--epochs", "1", "--iterations", "1", "--mipc", "2", "--factor", "1",
                     "--sweep", "cam_eps=0.3,0.6", "--sweep-ipc", "1", "--holdout-per-class", "1",
                     "--device", "cpu"])
    return rc, out


def test_study_runs_and_tables(done):
    rc, out = done
    assert rc == 0
    data = json.loads((out / "study.json").read_text())
    assert set(data["rows"]) == {"1/random", "1/cidd"}
    for key, row in data["rows"].items():
        run = json.loads((out / f"ipc1-{row['method']}" / "run.json").read_text())
        assert run["preset"] == "paper" and run["settings"]["mipc"] == 2  # the flags override the preset
        for mode in ("soft", "onehot", "dbr"):
            cell = row["top1"][mode]
            assert cell["values"] == run["top1"][mode] and cell["n"] == 2
            assert cell["mean"] == pytest.approx(sum(cell["values"]) / 2)
        soft, one, dbr = (row["top1"][m]["mean"] for m in ("soft", "onehot", "dbr"))
        if soft != one:
            assert row["recover_rate"] == pytest.approx((dbr - one) / (soft - one))
    (o,) = data["orderings"]  # only cidd > random has both sides here
    a, b = data["rows"]["1/cidd"]["top1"]["soft"], data["rows"]["1/random"]["top1"]["soft"]
    assert o["claim"] == "cidd > random" and o["diff"] == pytest.approx(a["mean"] - b["mean"])
    assert o["two_std"] == pytest.approx(2 * max(a["std"], b["std"]))
    (sw,) = data["sweeps"]
    assert sw["name"] == "cam_eps" and [q["value"] for q in sw["points"]] == [0.3, 0.6]
    assert sw["best_on_holdout"] == max(sw["points"], key=lambda q: q["mean"])["value"]
    for v in ("0.3", "0.6"):
        run = json.loads((out / f"sweep-cam_eps-{v}" / "run.json").read_text())
        assert run["eval_split"] == "holdout" and run["cam_eps"] == float(v)
    table = (out / "study.md").read_text()
    assert "| 1 | cidd |" in table and "Sweep of cam_eps" in table and "(best)" in table
    assert "--method cidd --ipc 1" in table
    from PIL import Image

    with Image.open(out / "sweep_cam_eps.png") as im:
        assert im.format == "PNG"
    assert not (out / "accuracy_ipc.png").exists()  # one IPC: no curve to draw
    with Image.open(out / "methods_ipc1.png") as im:  # 2 rows (methods) x 10 classes of 12 px + padding
        assert im.size == (10 * 14 + 2, 2 * 14 + 2)
    # the sweep's images: a row per value; the second row's first tile is class 0 of the 0.6 set
    assert (out / "sweep_cam_eps_images.txt").read_text() == "rows, top to bottom: cam_eps=0.3, cam_eps=0.6\n"
    import numpy as np
    import torch

    d = out / "sweep-cam_eps-0.6" / "distilled"
    cfg = json.loads((d / "config.json").read_text())
    images, labels = torch.load(d / "images.pt"), torch.load(d / "labels.pt")
    want = (images[labels == 0][0, 0] * cfg["std"][0] + cfg["mean"][0]).clamp(0, 1).mul(255).numpy()
    with Image.open(out / "sweep_cam_eps_images.png") as im:
        assert im.size == (10 * 14 + 2, 2 * 14 + 2)
        tile = np.asarray(im.convert("L"), dtype=np.float64)[16:28, 2:14]
    assert np.abs(tile - want).max() <= 1.0


def test_rerun_skips_finished_work(done, idx_dir, capsys):
    rc, out = done
    teacher = out.parent / "teacher.pt"
    before = (out / "ipc1-cidd" / "run.json").stat().st_mtime_ns
    assert study.main(["--teacher", str(teacher), "--out", str(out), "--data-dir", str(idx_dir), "--ipc", "1",
                       "--method", "random", "--method", "cidd", "--labels", "soft,onehot,dbr", "--seeds", "2",
                       "--epochs", "1", "--iterations", "1", "--mipc", "2", "--factor", "1",
                       "--device", "cpu"]) == 0
    assert (out / "ipc1-cidd" / "run.json").stat().st_mtime_ns == before
    assert capsys.readouterr().out.count("done before") == 2


def test_table_picks_up_students_added_later(done, idx_dir):
    """`nrrdd evaluate --seeds 3` on a finished run's set: the table reads the evaluation
    file, so the row now holds 3 students (and says so)."""
    from nrrdd.cli import main as nrrdd_main

    rc, out = done
    dist = out / "ipc1-cidd" / "distilled"
    assert nrrdd_main(["evaluate", "--distilled", str(dist), "--student", "convnet3", "--labels", "onehot",
                       "--seeds", "3", "--epochs", "1", "--data-dir", str(idx_dir), "--device", "cpu",
                       "--quiet"]) == 0
    assert study.main(["--out", str(out), "--ipc", "1", "--method", "random", "--method", "cidd",
                       "--labels", "soft,onehot,dbr", "--seeds", "2", "--table-only"]) == 0
    data = json.loads((out / "study.json").read_text())
    cell = data["rows"]["1/cidd"]["top1"]["onehot"]
    assert cell["n"] == 3 and cell["values"] == json.loads((dist / "eval_onehot_convnet3.json").read_text())["top1"]
    md = (out / "study.md").read_text()
    assert "(n=3)" in md and "--teacher TEACHER.pt --method cidd" in md  # no teacher given: a placeholder
    # a run resumed across processes: the distill column is its whole refinement when that is larger
    run_json = out / "ipc1-cidd" / "run.json"
    original = run_json.read_text()
    run = json.loads(original)
    run["seconds"].update(distill=12.0, refine_work=3456.4)
    run_json.write_text(json.dumps(run))
    try:
        assert study.main(["--out", str(out), "--ipc", "1", "--method", "cidd", "--labels", "soft,onehot,dbr",
                           "--seeds", "2", "--table-only"]) == 0
        row = next(ln for ln in (out / "study.md").read_text().splitlines() if ln.startswith("| 1 | cidd |"))
        assert row.split(" | ")[-3] == "3456"
    finally:  # the module's other tests read this run as it was made
        run_json.write_text(original)


def test_crop_and_factor_sweeps_of_another_method(done, idx_dir, capsys):
    """--sweep-method cidd --sweep crop_min=... --sweep factor=...: the commands each point
    runs, then one point run for real and read back into the table."""
    rc, out = done
    teacher = out.parent / "teacher.pt"
    base = ["--teacher", str(teacher), "--out", str(out), "--data-dir", str(idx_dir), "--ipc", "1",
            "--method", "cidd", "--labels", "soft", "--seeds", "1", "--epochs", "1", "--iterations", "1",
            "--mipc", "4", "--factor", "1", "--sweep-ipc", "1", "--holdout-per-class", "1", "--device", "cpu",
            "--sweep-method", "cidd"]
    capsys.readouterr()
    assert study.main(base + ["--sweep", "crop_min=0.25,0.5", "--sweep", "factor=2", "--sweep", "alpha_lr=0.1",
                              "--dry-run"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "sweep cidd" in ln]
    words = lines[3].split()
    assert len(lines) == 4 and words[words.index("--alpha-lr") + 1] == "0.1"
    assert "--crop-scale 0.25 1" in lines[0] and "--crop-scale 0.5 1" in lines[1]
    assert "--method cidd" in lines[0] and "--eval-split holdout" in lines[0]
    assert "sweep-cidd-crop_min-0.25" in lines[0] and "--factor 2" in lines[2] and "--factor 1" not in lines[2]
    assert study.main(base + ["--sweep", "crop_min=0.5", "--sweep-labels", "soft,dbr"]) == 0
    run = json.loads((out / "sweep-cidd-crop_min-0.5" / "run.json").read_text())
    assert run["crop_scale"] == [0.5, 1.0] and run["eval_split"] == "holdout" and run["method"] == "cidd"
    data = json.loads((out / "study.json").read_text())
    (sw,) = data["sweeps"]
    assert (sw["name"], sw["method"], sw["label_modes"]) == ("crop_min", "cidd", ["soft", "dbr"])
    (pt,) = sw["points"]
    assert pt["values"] == run["top1"]["soft"] and pt["labels"]["dbr"]["values"] == run["top1"]["dbr"]
    md = (out / "study.md").read_text()
    assert "Sweep of crop_min (cidd" in md and "holdout top-1, dbr labels" in md
    assert f"| 0.5 | {pt['mean']:.2f} ± 0.00 (best) | {pt['labels']['dbr']['mean']:.2f} ± 0.00 |" in md
    assert (out / "sweep_cidd_crop_min.png").is_file()


def test_r_sweep_without_label_refinement_distils_once(done, idx_dir, capsys):
    """For cidd (no L_lr) r reaches only the DBR students: one distillation at the
    defaults, then the DBR students of each margin on it; for nrr each r distils anew."""
    rc, out = done
    teacher = out.parent / "teacher.pt"
    base = ["--teacher", str(teacher), "--out", str(out), "--data-dir", str(idx_dir), "--ipc", "1",
            "--method", "cidd", "--labels", "soft", "--seeds", "1", "--epochs", "1", "--iterations", "1",
            "--mipc", "4", "--factor", "1", "--sweep-ipc", "1", "--holdout-per-class", "1", "--device", "cpu"]
    with pytest.raises(SystemExit):  # no DBR students: nothing in the sweep would change
        study.main(base + ["--sweep-method", "cidd", "--sweep", "r=0.1,0.4"])
    with pytest.raises(SystemExit):
        study.main(base + ["--sweep-method", "cidd", "--sweep", "r=0.1,-1", "--sweep-labels", "dbr"])
    capsys.readouterr()
    assert study.main(base + ["--sweep-method", "nrr", "--sweep", "r=0.1,0.4", "--dry-run"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "sweep nrr r" in ln]
    assert len(lines) == 2 and "--r 0.1" in lines[0] and "sweep-r-0.1" in lines[0]
    assert not any("-fast" in ln for ln in lines)  # nrrdd's own default unless asked
    for flag in ("--fast", "--no-fast"):
        assert study.main(base + ["--sweep-method", "nrr", "--sweep", "r=0.1,0.4", flag, "--dry-run"]) == 0
        lines = [ln for ln in capsys.readouterr().out.splitlines() if "sweep nrr r" in ln]
        assert len(lines) == 2 and all(ln.split()[-1] == flag for ln in lines)
    assert study.main(base + ["--method", "sre2l-nolr", "--sweep-method", "sre2l-nolr", "--sweep", "r=0.1",
                              "--sweep-labels", "dbr", "--dry-run"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "sre2l-nolr" in ln]
    assert "--method sre2l" in lines[0] and "--no-label-refine" in lines[0] and "ipc1-sre2l-nolr" in lines[0]
    assert "sweep-sre2l-nolr-r-base" in lines[1] and "--dbr-r 0.1" in lines[2]  # no L_lr: one set
    assert not any("channels-last" in ln for ln in lines)
    assert study.main(base + ["--method", "sre2l-nolr", "--sweep-method", "sre2l-nolr", "--sweep", "r=0.1",
                              "--sweep-labels", "dbr", "--student-channels-last", "--dry-run"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "sre2l-nolr" in ln]
    assert " run " in lines[0] and lines[0].split()[-1] == "--student-channels-last"
    assert " evaluate " in lines[2] and lines[2].split()[-1] == "--channels-last"
    assert study.main(base + ["--sweep-method", "cidd", "--sweep", "r=0.1,0.4", "--sweep-labels", "soft,dbr"]) == 0
    made = sorted(d.name for d in out.glob("sweep-cidd-r-*"))
    assert made == ["sweep-cidd-r-base"]
    run = json.loads((out / "sweep-cidd-r-base" / "run.json").read_text())
    assert run["r"] == 0.4 and run["eval_split"] == "holdout"
    e01 = json.loads((out / "sweep-cidd-r-base" / "distilled" / "eval_dbr-r0.1_convnet3-holdout.json").read_text())
    assert e01["dbr_r"] == 0.1 and e01["eval_split"] == "holdout"
    sw = [s for s in json.loads((out / "study.json").read_text())["sweeps"] if s["name"] == "r"][0]
    assert sw["students_only"] and sw["label_modes"] == ["dbr", "soft"]
    p01, p04 = sw["points"]
    assert (p01["value"], p04["value"]) == (0.1, 0.4)
    assert p01["values"] == e01["top1"] and p04["values"] == run["top1"]["dbr"]
    assert p01["labels"]["soft"]["values"] == p04["labels"]["soft"]["values"] == run["top1"]["soft"]
    assert sw["best_on_holdout"] == (0.1 if p01["mean"] >= p04["mean"] else 0.4)  # ties: the first
    # soft students evaluated on the base set afterwards (more seeds): the points read them
    from nrrdd.cli import main as nrrdd_main

    dist = out / "sweep-cidd-r-base" / "distilled"
    assert nrrdd_main(["evaluate", "--distilled", str(dist), "--student", "convnet3", "--labels", "soft",
                       "--seeds", "2", "--epochs", "1", "--eval-split", "holdout", "--holdout-per-class", "1",
                       "--data-dir", str(idx_dir), "--device", "cpu", "--quiet"]) == 0
    soft = json.loads((dist / "eval_soft_convnet3-holdout.json").read_text())["top1"]
    assert len(soft) == 2 and len(run["top1"]["soft"]) == 1
    assert study.main(base + ["--sweep-method", "cidd", "--sweep", "r=0.1,0.4", "--sweep-labels", "soft,dbr",
                              "--table-only"]) == 0
    sw = [s for s in json.loads((out / "study.json").read_text())["sweeps"] if s["name"] == "r"][0]
    assert all(p["labels"]["soft"]["values"] == soft for p in sw["points"])


def test_cross_student_on_a_chosen_set(done, idx_dir):
    """--cross-method cidd --cross-ipc 1 --cross-student mobilenetv2: the finished cidd set
    is evaluated on another student arch, and the table's cross row holds those students."""
    rc, out = done
    teacher = out.parent / "teacher.pt"
    assert study.main(["--teacher", str(teacher), "--out", str(out), "--data-dir", str(idx_dir), "--ipc", "1",
                       "--method", "cidd", "--labels", "soft,onehot,dbr", "--seeds", "2", "--epochs", "1",
                       "--iterations", "1", "--mipc", "2", "--factor", "1", "--device", "cpu",
                       "--cross-method", "cidd", "--cross-ipc", "1", "--cross-student", "mobilenetv2"]) == 0
    ev = json.loads((out / "ipc1-cidd" / "distilled" / "eval_soft_mobilenetv2.json").read_text())
    assert len(ev["top1"]) == 2 and all(0 <= v <= 100 for v in ev["top1"])
    (c,) = json.loads((out / "study.json").read_text())["cross"]
    assert (c["method"], c["ipc"], c["teacher"], c["student"]) == ("cidd", 1, "convnet3", "mobilenetv2")
    assert c["values"] == ev["top1"] and c["n"] == 2
    md = (out / "study.md").read_text()
    assert f"| 1 | cidd | convnet3 | convnet3 | mobilenetv2 | {c['mean']:.2f} ± {c['std']:.2f} |" in md


def test_distillation_seeds_pool_into_one_row(done, idx_dir, capsys):
    """--distill-seeds 2: a second distillation (`--seed 1`) into ipc1-random-seed1/, and the
    row pools the students of both, with the spread between the two distillations."""
    rc, out = done
    teacher = out.parent / "teacher.pt"
    args = ["--teacher", str(teacher), "--out", str(out), "--data-dir", str(idx_dir), "--ipc", "1",
            "--method", "random", "--labels", "soft,onehot,dbr", "--seeds", "2", "--epochs", "1",
            "--iterations", "1", "--mipc", "2", "--factor", "1", "--device", "cpu", "--distill-seeds", "2"]
    capsys.readouterr()
    assert study.main(args) == 0
    assert "ipc 1 random: done before" in capsys.readouterr().out  # seed 0 is the fixture's run
    r0 = json.loads((out / "ipc1-random" / "run.json").read_text())
    r1 = json.loads((out / "ipc1-random-seed1" / "run.json").read_text())
    assert (r0["seed"], r1["seed"]) == (0, 1)
    c0 = json.loads((out / "ipc1-random" / "distilled" / "config.json").read_text())
    c1 = json.loads((out / "ipc1-random-seed1" / "distilled" / "config.json").read_text())
    assert c0["source_indices"] != c1["source_indices"]  # another draw of real images
    row = json.loads((out / "study.json").read_text())["rows"]["1/random"]
    assert row["distill_seeds"] == [0, 1]
    for mode in ("soft", "onehot", "dbr"):
        cell = row["top1"][mode]
        assert cell["values"] == r0["top1"][mode] + r1["top1"][mode] and cell["n"] == 4
        means = [sum(r["top1"][mode]) / 2 for r in (r0, r1)]
        assert cell["distillations"] == 2 and cell["distill_std"] == pytest.approx(abs(means[0] - means[1]) / 2)
    md = (out / "study.md").read_text()
    assert "2 distillations, their means ±" in md and "and with `--seed 1`" in md
    with pytest.raises(SystemExit):
        study.main(args[:-2] + ["--distill-seeds", "0"])


def test_recover_rate_ignores_a_soft_only_distillation(done, idx_dir):
    """A third distillation with soft labels only joins the soft cell, not the recover rate:
    that stays (dbr - onehot) / (soft - onehot) over the distillations that have all three."""
    rc, out = done
    teacher = out.parent / "teacher.pt"
    assert study.main(["--teacher", str(teacher), "--out", str(out), "--data-dir", str(idx_dir), "--ipc", "1",
                       "--method", "random", "--labels", "soft", "--seeds", "2", "--epochs", "1",
                       "--iterations", "1", "--mipc", "2", "--factor", "1", "--device", "cpu",
                       "--distill-seeds", "3"]) == 0
    runs = [json.loads((out / d / "run.json").read_text()) for d in ("ipc1-random", "ipc1-random-seed1")]
    r2 = json.loads((out / "ipc1-random-seed2" / "run.json").read_text())
    assert set(r2["top1"]) == {"soft"}
    row = json.loads((out / "study.json").read_text())["rows"]["1/random"]
    assert row["top1"]["soft"]["n"] == 6 and row["top1"]["onehot"]["n"] == 4
    mean = {m: sum(v for r in runs for v in r["top1"][m]) / 4 for m in ("soft", "onehot", "dbr")}
    rec = (mean["dbr"] - mean["onehot"]) / (mean["soft"] - mean["onehot"]) if mean["soft"] > mean["onehot"] else None
    assert row["recover_rate"] == pytest.approx(rec)
    # one-hot students of the third set, evaluated after its run: they join the row's one-hot
    # cell (and its command), and still not the recover rate (that set has no DBR students)
    from nrrdd.cli import main as nrrdd_main

    dist = out / "ipc1-random-seed2" / "distilled"
    # one-hot labels stored at the study's epochs first (as `nrrdd run` does), so the
    # evaluation is of the study's protocol, not a variant named by its epochs
    assert nrrdd_main(["relabel", "--distilled", str(dist), "--mode", "onehot", "--epochs", "1", "--quiet"]) == 0
    assert nrrdd_main(["evaluate", "--distilled", str(dist), "--student", "convnet3", "--labels", "onehot",
                       "--seeds", "2", "--epochs", "1", "--data-dir", str(idx_dir), "--device", "cpu",
                       "--quiet"]) == 0
    later = json.loads((dist / "eval_onehot_convnet3.json").read_text())["top1"]
    assert study.main(["--out", str(out), "--ipc", "1", "--method", "random", "--labels", "soft", "--seeds", "2",
                       "--epochs", "1", "--iterations", "1", "--mipc", "2", "--factor", "1",
                       "--distill-seeds", "3", "--table-only"]) == 0
    row = json.loads((out / "study.json").read_text())["rows"]["1/random"]
    cell = row["top1"]["onehot"]
    assert cell["n"] == 6 and cell["distillations"] == 3 and cell["values"][-2:] == later
    assert row["recover_rate"] == pytest.approx(rec) and "--labels soft,onehot,dbr" in row["command"]


def test_summary_is_cumulative_over_invocations(done, idx_dir, capsys):
    """One method per invocation (as long studies are run): study.json and the methods
    figure keep the earlier rows, sweeps and cross rows; a changed protocol starts afresh."""
    rc, out = done
    teacher = out.parent / "teacher.pt"
    new = out.parent / "cumulative"
    args = ["--teacher", str(teacher), "--out", str(new), "--data-dir", str(idx_dir), "--ipc", "1",
            "--labels", "soft", "--seeds", "1", "--epochs", "1", "--iterations", "1", "--mipc", "2",
            "--factor", "1", "--device", "cpu"]
    assert study.main(args + ["--method", "cidd", "--cross-method", "cidd", "--cross-ipc", "1",
                              "--cross-student", "mobilenetv2"]) == 0
    first = json.loads((new / "study.json").read_text())
    assert study.main(args + ["--method", "random", "--labels", "soft,onehot"]) == 0
    data = json.loads((new / "study.json").read_text())
    assert set(data["rows"]) == {"1/random", "1/cidd"}
    assert data["rows"]["1/cidd"]["top1"] == first["rows"]["1/cidd"]["top1"]
    run = json.loads((new / "ipc1-random" / "run.json").read_text())
    assert data["rows"]["1/random"]["top1"]["onehot"]["values"] == run["top1"]["onehot"]
    assert data["labels"] == ["soft", "onehot"] and data["cross"] == first["cross"]
    (o,) = data["orderings"]
    assert o["claim"] == "cidd > random"
    md = (new / "study.md").read_text()
    assert md.index("| 1 | random |") < md.index("| 1 | cidd |")  # METHODS order, not invocation order
    assert "mobilenetv2" in md
    # a row keeps the command that made it (cidd ran with soft labels only)
    assert data["rows"]["1/cidd"]["command"] == first["rows"]["1/cidd"]["command"]
    assert "--labels soft --" in data["rows"]["1/cidd"]["command"]
    assert "--labels soft,onehot --" in data["rows"]["1/random"]["command"]
    # a later invocation naming more label modes does not rewrite what a row ran
    assert study.main(args + ["--method", "cidd", "--labels", "soft,onehot,dbr", "--table-only"]) == 0
    again = json.loads((new / "study.json").read_text())
    assert "--labels soft --" in again["rows"]["1/cidd"]["command"]
    from PIL import Image

    with Image.open(new / "methods_ipc1.png") as im:  # both methods' rows
        assert im.size == (10 * 14 + 2, 2 * 14 + 2)
    assert (new / "methods_ipc1.txt").read_text() == "rows, top to bottom: random, cidd\n"
    capsys.readouterr()
    other = list(args)
    other[other.index("--epochs") + 1] = "2"
    assert study.main(other + ["--method", "random", "--table-only"]) == 0
    assert "another protocol" in capsys.readouterr().out
    assert list(json.loads((new / "study.json").read_text())["rows"]) == ["1/random"]


def test_jobs_run_side_by_side_to_the_same_numbers(done, idx_dir, capsys):
    """--jobs 3: the fixture's two cells and its ε sweep, run at once into a fresh folder,
    give the same students as the one-at-a-time fixture (every run is seeded), and the
    evaluation phase after them fills the cross-architecture row."""
    rc, out = done
    teacher = out.parent / "teacher.pt"
    fresh = out.parent / "jobs3"
    args = ["--teacher", str(teacher), "--out", str(fresh), "--data-dir", str(idx_dir), "--ipc", "1",
            "--method", "random", "--method", "cidd", "--labels", "soft,onehot,dbr", "--seeds", "2",
            "--epochs", "1", "--iterations", "1", "--mipc", "2", "--factor", "1",
            "--sweep", "cam_eps=0.3,0.6", "--sweep-ipc", "1", "--holdout-per-class", "1",
            "--cross-student", "convnet3", "--cross-ipc", "1", "--cross-method", "cidd",
            "--device", "cpu", "--jobs", "3"]
    assert study.main(args) == 0
    for d in ("ipc1-random", "ipc1-cidd", "sweep-cam_eps-0.3", "sweep-cam_eps-0.6"):
        a = json.loads((out / d / "run.json").read_text())["top1"]
        b = json.loads((fresh / d / "run.json").read_text())["top1"]
        assert a == b, d
    cross = json.loads((fresh / "study.json").read_text())["cross"]
    assert [c["student"] for c in cross] == ["convnet3"] and len(cross[0]["values"]) == 2
    with pytest.raises(SystemExit):
        study.main(args[:-1] + ["0"])


def test_swap_labels_make_the_two_by_two(done, idx_dir):
    """--cross-teacher with --swap-labels: each teacher's cidd set labelled by the other
    (`nrrdd run --images-from`), after the runs that make the sets; the cross table holds
    the three cells beside the main row, each the students of its own run."""
    import torch

    rc, out = done
    teacher = out.parent / "teacher.pt"
    other = make_teacher(out.parent / "other.pt", num_classes=10, image_size=12, dataset="fashion-mnist",
                         arch="resnet18", seed=1)
    fresh = out.parent / "swap"
    args = ["--teacher", str(teacher), "--out", str(fresh), "--data-dir", str(idx_dir), "--ipc", "1",
            "--method", "cidd", "--labels", "soft", "--seeds", "1", "--epochs", "1", "--iterations", "1",
            "--mipc", "2", "--factor", "1", "--cross-method", "cidd", "--cross-ipc", "1",
            "--cross-teacher", str(other), "--swap-labels", "--device", "cpu", "--jobs", "2"]
    assert study.main(args) == 0
    cross = {(c["teacher"], c["labels_by"]): c for c in json.loads((fresh / "study.json").read_text())["cross"]}
    assert set(cross) == {("resnet18", "resnet18"), ("convnet3", "resnet18"), ("resnet18", "convnet3")}
    for chooser, labeller, images in (("convnet3", "resnet18", "ipc1-cidd"),
                                      ("resnet18", "convnet3", "cross-teacher-ipc1-cidd")):
        d = fresh / f"swap-cidd-ipc1-images-{'main' if chooser == 'convnet3' else 'cross'}"
        run = json.loads((d / "run.json").read_text())
        assert run["images_from"] == str((fresh / images / "distilled").resolve())
        assert run["teacher"]["arch"] == labeller and cross[chooser, labeller]["values"] == run["top1"]["soft"]
        assert torch.equal(torch.load(d / "distilled" / "images.pt"), torch.load(fresh / images / "distilled" / "images.pt"))
    md = (fresh / "study.md").read_text()
    c = cross["convnet3", "resnet18"]
    assert f"| 1 | cidd | convnet3 | resnet18 | convnet3 | {c['mean']:.2f} ± {c['std']:.2f} |" in md
    with pytest.raises(SystemExit):
        study.main([a for a in args if a != str(other) and a != "--cross-teacher"])


def test_record_holds_every_distillation_and_keeps_other_rows(done, tmp_path, capsys):
    """--record: one CSV row per (IPC, method, label mode, distillation) with the students'
    values as the run folders hold them; a row another study wrote stays; a rerun
    replaces its rows rather than adding them again; a record that does not parse is
    refused before any work."""
    import time

    import results_record

    rc, out = done
    rec = tmp_path / "record.csv"
    teacher = json.loads((out / "ipc1-random" / "run.json").read_text())["teacher"]
    name = results_record.teacher_name(teacher["arch"], teacher["test_accuracy"])
    other = results_record.from_values(50, "nrr", "soft", 2, [80.5, 81.3], "2026-11-01", name)
    results_record.merge(rec, [other])
    args = ["--out", str(out), "--ipc", "1", "--method", "random", "--method", "cidd",
            "--labels", "soft,onehot,dbr", "--seeds", "2", "--table-only", "--record", str(rec)]
    assert study.main(args) == 0
    want = {}
    for method in ("random", "cidd"):
        for seed, d in study.distillations(out, 1, method):
            rj = json.loads((d / "run.json").read_text())
            for mode in study.LABELS:
                src = study._top1_source(d, rj, mode)
                if values := study._top1(d, rj, mode):  # (another test's distillation may lack a mode)
                    want[(1, method, mode, seed)] = (values, time.strftime("%Y-%m-%d",
                                                                           time.gmtime(src.stat().st_mtime)))
    rows = {(r["ipc"], r["method"], r["labels"], r["distillation"]): r for r in results_record.read(rec)}
    assert set(rows) == set(want) | {(50, "nrr", "soft", 2)}
    for key, (values, day) in want.items():
        assert rows[key]["top1"] == pytest.approx(values, abs=1e-3) and rows[key]["measured"] == day
        assert rows[key]["students"] == len(values)
    assert rows[(50, "nrr", "soft", 2)]["top1"] == [80.5, 81.3]
    assert {r["teacher"] for r in rows.values()} == {name}
    capsys.readouterr()
    assert study.main(args) == 0
    assert f"{rec}: 0 rows added, {len(want)} replaced" in capsys.readouterr().out
    assert len(results_record.read(rec)) == len(want) + 1
    bad = tmp_path / "bad.csv"
    bad.write_text("ipc,method\n1,nrr\n")
    before = (out / "study.json").stat().st_mtime_ns
    with pytest.raises(SystemExit):
        study.main(args[:-1] + [str(bad)])
    assert (out / "study.json").stat().st_mtime_ns == before and bad.read_text() == "ipc,method\n1,nrr\n"
    alien = tmp_path / "alien.csv"  # a record of another teacher: refused, left as it was
    results_record.merge(alien, [results_record.from_values(10, "nrr", "soft", 0, [70.0], "2026-11-01",
                                                            "resnet18 0.9999")])
    text = alien.read_text()
    assert study.main(args[:-1] + [str(alien)]) == 2
    assert alien.read_text() == text and "one teacher's students" in capsys.readouterr().err


def test_a_method_at_a_setting_is_a_test_set_row(done, idx_dir, capsys):
    """--method cidd@crop_min=0.5: the holdout's choice measured on the test set, in
    ipc1-cidd-crop_min0.5/, its row under cidd's; a malformed setting is refused."""
    rc, out = done
    teacher = out.parent / "teacher.pt"
    base = ["--teacher", str(teacher), "--out", str(out), "--data-dir", str(idx_dir), "--ipc", "1",
            "--labels", "soft", "--seeds", "2", "--epochs", "1", "--iterations", "1", "--mipc", "2",
            "--factor", "1", "--device", "cpu"]
    assert study.main([*base, "--method", "cidd@crop_min=0.5"]) == 0
    run = json.loads((out / "ipc1-cidd-crop_min0.5" / "run.json").read_text())
    assert run["crop_scale"] == [0.5, 1.0] and run["eval_split"] == "test" and run["method"] == "cidd"
    data = json.loads((out / "study.json").read_text())
    row = data["rows"]["1/cidd@crop_min=0.5"]
    assert row["top1"]["soft"]["values"] == run["top1"]["soft"] and row["top1"]["soft"]["n"] == 2
    assert "--crop-scale 0.5 1" in row["command"] and "ipc1-cidd-crop_min0.5" in row["command"]
    import argparse

    cells = study._cells(argparse.Namespace(ipc=[1], methods=["nrr@cam_eps=0.3", "sre2l-nolr", "nrr", "random"]),
                         None)
    assert [m for _, m in cells] == ["random", "nrr", "nrr@cam_eps=0.3", "sre2l-nolr"]  # under its method
    assert "| 1 | cidd@crop_min=0.5 |" in (out / "study.md").read_text()
    for bad in ("cidd@crop=0.5", "cidd@crop_min=-1", "cidd@crop_min", "nope@cam_eps=0.3"):
        with pytest.raises(SystemExit):
            study.main([*base, "--method", bad])
        assert "--method" in capsys.readouterr().err

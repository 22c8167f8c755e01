"""``nrrdd status`` (nrrdd.progress): what an interrupted run reports equals the state it saved."""
from __future__ import annotations

import json

import pytest
import torch
from nrrdd_toy import fresh_seed, make_distilled, make_imagefolder, make_teacher

import nrrdd.student as S
from nrrdd import labels as L
from nrrdd.cli import main
from nrrdd.distill import DistillSettings, distill, refine_batches
from nrrdd.progress import (find_distilled, find_runs, format_progress, human_seconds, method_label, progress,
                            teacher_progress)

CLASSES, IPC, SIZE = 3, 2, 16


@pytest.fixture
def toy(tmp_path):
    make_imagefolder(tmp_path / "data", CLASSES, 8, 4, SIZE)
    make_teacher(tmp_path / "teacher.pt", CLASSES, 1, SIZE)
    return tmp_path


def _settings(toy, out, **kw):
    base = dict(dataset="imagefolder", data_dir=str(toy / "data"), teacher=str(toy / "teacher.pt"), ipc=IPC,
                out=str(out), iterations=3, mipc=4, num_crop=2, top_t=2, batch_size=4, log_every=2,
                quiet=True, label_refine=False, cam_eps=0.7)
    return DistillSettings(**{**base, **kw})


def test_interrupted_distill_reports_its_saved_state(toy, capsys):
    """Stopped after batch 2's second iteration: CIDD 3/3, NRR 1/2 batches, batch 2 at 2/3;
    the average pace is the saved seconds over the iterations done, the recent one the
    last save's interval (one iteration, not two), the time left the rest at the recent pace."""
    run = toy / "study" / "cell"
    out, seed = run / "distilled", fresh_seed() % 1000
    saves = []

    def stop_in_batch_2(stage, i):
        saves.append((stage, i))
        if saves.count(("refine_state", 1)) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(_settings(toy, out, seed=seed), on_unit=stop_in_batch_2, checkpoint_every_s=0)
    assert find_distilled([toy / "study"]) == [out] == find_distilled([out])
    p = progress(out)
    d = p["distill"]
    batches = len(refine_batches(CLASSES, IPC, 4))
    unit = torch.load(out / "partial" / "refine" / "00000.pt")
    state = torch.load(out / "partial" / "refine" / "00001.state.pt")
    assert p["path"] == str(run) and p["ipc"] == IPC and p["method"] == "nrr (no L_lr, ε 0.7)"
    assert d["state"] == "running" and d["cidd_done"] == d["classes"] == CLASSES
    assert (d["batches_done"], d["batches"], d["iterations"]) == (1, batches, 3)
    assert [(s["batch"], s["step"], s["iterations"]) for s in d["in_flight"]] == [(1, 2, 3)]
    assert d["in_flight"][0]["seconds"] == pytest.approx(state["seconds"])
    pace = (unit["seconds"] + state["seconds"]) / (3 + 2)
    assert d["seconds_per_iteration"] == pytest.approx(pace)
    assert state["recent"]["iterations"] == 1 and 0 < state["recent"]["seconds"] < state["seconds"]
    recent = state["recent"]["seconds"]
    assert d["recent_seconds_per_iteration"] == pytest.approx(recent)
    assert d["refine_seconds_left"] == pytest.approx((batches * 3 - 3 - 2) * recent)
    assert p["labels"] == [] and p["students"] == {"done": [], "running": []} and not p["run_done"]
    text = format_progress(p)
    assert "CIDD 3/3 classes · NRR 1/2 batches; batch 2 at iteration 2/3" in text
    assert f"{recent:.2f} s/iteration before the last save ({pace:.2f} on average)" in text
    assert text.splitlines()[0].startswith(f"{run}  (nrr (no L_lr, ε 0.7) · IPC 2")
    assert main(["status", str(toy / "study")]) == 0
    assert "batch 2 at iteration 2/3" in capsys.readouterr().out
    assert main(["status", "--json", str(out)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["teacher_trainings"] == []
    (got,) = got["runs"]
    assert got["distill"]["in_flight"][0]["step"] == 2 and got["distill"]["batches_done"] == 1
    # finished: the time the run recorded, and the whole refinement across both processes
    distill(_settings(toy, out, seed=seed), resume=True)
    d = progress(out)["distill"]
    cfg = json.loads((out / "config.json").read_text())
    t = cfg["timings"]
    assert d["state"] == "done" and d["seconds"] == t["total"] and d["refine_work"] == t["refine_work"]
    assert unit["seconds"] + state["seconds"] <= t["refine_work"] <= unit["seconds"] + state["seconds"] + t["refine"]
    assert f"(resumed; refinement {human_seconds(t['refine_work'])} in all)" in format_progress(progress(out))


def test_labels_and_students_under_way_report_their_epochs(toy, monkeypatch):
    """A relabel stopped before epoch 2 of 4 and an evaluation stopped in seed 1's epoch 2:
    the status names the epochs done, seed 0's top-1, seed 1's epoch; then the finished
    evaluation's mean ± std."""
    dist = make_distilled(toy / "dist", toy / "teacher.pt", toy / "data", 4, CLASSES, 1, SIZE)
    # a set without distill's config (random real images, a made-up set): found by its images
    assert find_distilled([toy]) == [dist]
    assert progress(dist)["distill"]["state"] == "done"
    assert "\n  distill   done\n" in format_progress(progress(dist)) + "\n"
    real_write = L.LabelStore.write_epoch

    def failing_write(self, epoch, arrays, flds):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_write(self, epoch, arrays, flds)

    relabel = ["relabel", "--distilled", str(dist), "--mode", "soft", "--epochs", "4", "--batch-size", "4",
               "--device", "cpu", "--quiet"]
    monkeypatch.setattr(L.LabelStore, "write_epoch", failing_write)
    with pytest.raises(KeyboardInterrupt):
        main(relabel)
    monkeypatch.setattr(L.LabelStore, "write_epoch", real_write)
    (lab,) = progress(dist)["labels"]
    assert (lab["mode"], lab["epochs_done"], lab["epochs"], lab["complete"]) == ("soft", 2, 4, False)
    assert "soft: 2/4 epochs (under way" in format_progress(progress(dist))
    assert main(relabel + ["--resume"]) == 0

    real_train = S.train_student

    def stop_seed_1(*args, **kw):
        if args[7] != 1:  # student_seed
            return real_train(*args, **kw)
        targets = args[3]

        def interrupting(mb):
            if mb.epoch == 2:
                raise KeyboardInterrupt
            return targets(mb)

        return real_train(*args[:3], interrupting, *args[4:], **{**kw, "checkpoint_every_s": 0.0})

    evaluate = ["evaluate", "--distilled", str(dist), "--labels", "soft", "--student", "convnet3",
                "--seeds", "2", "--device", "cpu", "--quiet"]
    monkeypatch.setattr(S, "train_student", stop_seed_1)
    with pytest.raises(KeyboardInterrupt):
        main(evaluate)
    monkeypatch.setattr(S, "train_student", real_train)
    st = progress(dist)["students"]
    (ev,) = st["running"]
    seed0 = json.loads((dist / ".eval_soft_convnet3" / "seed0.json").read_text())
    ckpt = torch.load(dist / ".eval_soft_convnet3" / "seed1.pt", weights_only=True)
    assert ev["name"] == "eval_soft_convnet3" and ev["finished"] == {0: seed0["top1"]}
    (t,) = ev["training"]
    assert (t["seed"], t["epoch"], t["epochs"]) == (1, 2, 4) and t["seconds"] == pytest.approx(ckpt["seconds"])
    assert t["seconds_left"] == pytest.approx(2 * ckpt["seconds"] / 2)
    assert f"1 finished (seed 0 {seed0['top1']:.2f}); seed 1 at epoch 2/4" in format_progress(progress(dist))
    assert main(evaluate + ["--resume"]) == 0
    st = progress(dist)["students"]
    e = json.loads((dist / "eval_soft_convnet3.json").read_text())
    assert st["running"] == [] and st["done"] == [{"name": "eval_soft_convnet3", "labels": "soft",
                                                   "student": "convnet3", "split": "test", "n": 2,
                                                   "mean": e["top1_mean"], "std": e["top1_std"]}]
    assert e["top1"][0] == seed0["top1"]


def test_method_label_names_what_differs_from_the_defaults():
    cfg = {"method": "nrr", "settings": {"iterations": 5, "label_refine": True, "mask": "cam", "cam_eps": 0.5}}
    assert method_label(cfg) == "nrr"
    cfg["settings"].update(label_refine=False, cam_eps=0.9)
    assert method_label(cfg) == "nrr (no L_lr, ε 0.9)"
    assert method_label({"method": "cidd", "settings": {"iterations": 0, "cam_eps": 0.3}}) == "cidd"
    assert method_label({"method": "sre2l", "settings": {"iterations": 5, "mask": "none", "cam_eps": 0.3,
                                                         "alpha_lr": 1.0}}) == "sre2l"


def test_run_stopped_in_its_teacher_training_reports_the_epoch_and_resumes(toy, monkeypatch, capsys):
    """`nrrdd run` killed after the teacher's epoch 1 of 3: the status names the epoch, the
    pace and the time left from the saved state; --resume finishes the training to the
    weights of an uninterrupted run."""
    import nrrdd.teacher as T

    real = T.train_teacher

    def stop_after_epoch_1(*args, **kw):
        def on_epoch_end(epoch):
            if epoch == 1:
                raise KeyboardInterrupt

        return real(*args, **kw, on_epoch_end=on_epoch_end)

    seed = str(fresh_seed() % 1000)
    argv = ["run", "--dataset", "imagefolder", "--data-dir", str(toy / "data"), "--image-size", str(SIZE),
            "--ipc", "1", "--iterations", "1", "--mipc", "4", "--factor", "1", "--epochs", "1",
            "--teacher-epochs", "3", "--labels", "soft", "--seed", seed, "--device", "cpu", "--quiet"]
    a, b = toy / "runs" / "a", toy / "runs" / "b"
    monkeypatch.setattr(T, "train_teacher", stop_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        main(argv + ["--out", str(a)])
    monkeypatch.setattr(T, "train_teacher", real)
    partial = a / "teacher.pt.partial"
    state = torch.load(partial)
    assert find_runs([toy / "runs"]) == ([], [partial])
    t = teacher_progress(partial)
    assert (t["arch"], t["epoch"], t["epochs"], t["checkpoint"]) == ("convnet3", 1, 3, str(a / "teacher.pt"))
    assert t["seconds_per_epoch"] == pytest.approx(state["seconds"])
    assert t["seconds_left"] == pytest.approx(2 * state["seconds"])
    assert main(["status", str(toy / "runs")]) == 0
    text = capsys.readouterr().out
    assert f"{a / 'teacher.pt'}  (teacher convnet3 · imagefolder; training)" in text
    assert "teacher   epoch 1/3 done" in text
    assert main(["status", "--json", str(a)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["runs"] == [] and [x["epoch"] for x in got["teacher_trainings"]] == [1]
    assert main(argv + ["--out", str(a)]) == 2  # not without --resume: the epoch is kept
    assert "--resume" in capsys.readouterr().err and partial.is_file()
    assert main(argv + ["--out", str(a), "--resume"]) == 0
    assert not partial.exists()
    assert main(argv + ["--out", str(b)]) == 0
    resumed, whole = torch.load(a / "teacher.pt"), torch.load(b / "teacher.pt")
    assert resumed["epochs"] == whole["epochs"] == 3
    for k, v in whole["state_dict"].items():
        assert torch.equal(resumed["state_dict"][k], v), k


def test_a_folder_without_runs_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["status", str(tmp_path / "empty")]) == 2
    assert "holds no distilled set" in capsys.readouterr().err
    assert main(["status", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err

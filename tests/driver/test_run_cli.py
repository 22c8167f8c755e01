"""``nrrdd run`` end to end on a tiny made-up image folder, every method, bad input; ``nrrdd report``."""
from __future__ import annotations

import json

import pytest
import torch

from nrrdd.cli import main
from nrrdd.data import DEBIAN_FASHION_MNIST, load_split, normalize
from nrrdd.teacher import load_teacher
from nrrdd_toy import fresh_seed, make_imagefolder, make_teacher

SIZE = 16
TINY = ["--image-size", str(SIZE), "--ipc", "2", "--iterations", "2", "--mipc", "6", "--factor", "1",
        "--epochs", "2", "--teacher-epochs", "1", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("toy") / "data", 3, 10, 5, SIZE, seed=fresh_seed())


@pytest.fixture(scope="module")
def first_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    rc = main(["run", "--dataset", "imagefolder", "--data-dir", str(data), "--out", str(out),
               "--preset", "quick", "--labels", "dbr,onehot", "--export-ddranking", *TINY])
    return rc, out


def test_quick_preset_end_to_end(first_run, data):
    rc, out = first_run
    assert rc == 0
    for f in ("teacher.pt", "run.json", "report.md", "distilled/images.pt", "distilled/labels.pt",
              "distilled/config.json", "distilled/labels_dbr/manifest.json", "distilled/eval_dbr_convnet3.json",
              "distilled/eval_onehot_convnet3.json", "ddranking/images.pt", "ddranking/labels.pt",
              "ddranking/soft_labels.pt"):
        assert (out / f).is_file(), f
    run = json.loads((out / "run.json").read_text())
    ev = json.loads((out / "distilled" / "eval_dbr_convnet3.json").read_text())
    assert run["top1"]["dbr"] == ev["top1"] and len(ev["top1"]) == 1
    assert ev["method"] == "nrr" and ev["preset"] == "quick" and ev["epochs"] == 2
    # 15 test images: the top-1 is a multiple of 100/15
    assert abs(ev["top1"][0] * 15 / 100 - round(ev["top1"][0] * 15 / 100)) < 1e-9
    images = torch.load(out / "distilled" / "images.pt")
    assert images.shape == (6, 1, SIZE, SIZE)
    assert run["label_bytes"] == {"dbr": 6 * 2 * 4, "onehot": 0}
    assert run["gpu_peak_GiB"] is None  # measured on CUDA only
    timings = json.loads((out / "distilled" / "timings.json").read_text())
    assert run["seconds"]["refine_work"] == timings["refine_work"] > 0  # 2 refinement iterations ran
    assert timings["refine_work"] <= timings["refine"]  # one process: within its refine stage
    assert torch.equal(torch.load(out / "ddranking" / "images.pt"), images)
    assert torch.load(out / "ddranking" / "soft_labels.pt").shape == (6, 3)
    table = (out / "report.md").read_text()
    assert "| imagefolder | nrr | 2 | dbr | convnet3 |" in table
    assert f"{ev['top1_mean']:.2f} ± 0.00 (n=1)" in table
    # the same folder again: refused without --resume, nothing to redo with it
    assert main(["run", "--dataset", "imagefolder", "--data-dir", str(data), "--out", str(out), *TINY]) == 2


def test_resume_reuses_everything(first_run, data):
    rc, out = first_run
    before = json.loads((out / "run.json").read_text())
    teacher_mtime = (out / "teacher.pt").stat().st_mtime_ns
    assert main(["run", "--dataset", "imagefolder", "--data-dir", str(data), "--out", str(out),
                 "--labels", "dbr,onehot", "--resume", *TINY]) == 0
    after = json.loads((out / "run.json").read_text())
    assert (out / "teacher.pt").stat().st_mtime_ns == teacher_mtime
    assert after["top1"] == before["top1"]


@pytest.mark.parametrize("method", ["cidd", "rded", "sre2l", "random"])
def test_every_method(first_run, data, tmp_path, method):
    teacher = first_run[1] / "teacher.pt"
    out = tmp_path / method
    layout = ["--student-channels-last"] if method == "cidd" else []  # reaches the students
    assert main(["run", "--dataset", "imagefolder", "--data-dir", str(data), "--out", str(out),
                 "--method", method, "--teacher", str(teacher), "--labels", "soft", *layout, *TINY]) == 0
    config = json.loads((out / "distilled" / "config.json").read_text())
    assert config["method"] == method
    ev = json.loads((out / "distilled" / "eval_soft_convnet3.json").read_text())
    assert ev["method"] == method and ev["labels"] == "soft"
    assert ev["channels_last"] == (method == "cidd") and ev["precision"] == "fp32"
    assert not (out / "teacher.pt").exists()  # the given teacher was used
    if method == "random":
        train = load_split("imagefolder", data, "train", SIZE)
        expect = normalize(train.get(config["source_indices"]), config["mean"], config["std"])
        assert torch.allclose(torch.load(out / "distilled" / "images.pt"), expect)
        assert torch.equal(torch.load(out / "distilled" / "labels.pt"), train.labels[config["source_indices"]])
    else:
        refine = config["refine"]
        assert config["settings"]["select"] == ("highest" if method == "rded" else "lowest")
        assert config["settings"]["iterations"] == (0 if method in ("cidd", "rded") else 2)
        assert refine["mask"] == ("none" if method == "sre2l" else "cam")


@pytest.mark.cuda
def test_run_on_cuda_every_label_mode(first_run, data, tmp_path):
    """The whole pipeline on the GPU (refinement, relabelling of every label mode,
    students, online students): it finishes, and each student's top-1 is a share of
    the 15 test images."""
    out = tmp_path / "cuda"
    tiny = [a if a != "cpu" else "cuda" for a in TINY]
    assert main(["run", "--dataset", "imagefolder", "--data-dir", str(data), "--out", str(out),
                 "--teacher", str(first_run[1] / "teacher.pt"), "--labels", "dbr,soft,compact,onehot", *tiny]) == 0
    assert main(["evaluate", "--distilled", str(out / "distilled"), "--student", "convnet3", "--labels", "soft",
                 "--online", "--epochs", "2", "--seeds", "1", "--device", "cuda", "--quiet"]) == 0
    names = ["eval_dbr_convnet3", "eval_soft_convnet3", "eval_compact_convnet3", "eval_onehot_convnet3",
             "eval_soft-online-e2_convnet3"]
    for name in names:
        ev = json.loads((out / "distilled" / f"{name}.json").read_text())
        assert len(ev["top1"]) == 1 and 0 <= ev["top1"][0] <= 100, name
        assert abs(ev["top1"][0] * 15 / 100 - round(ev["top1"][0] * 15 / 100)) < 1e-9, name
    config = json.loads((out / "distilled" / "config.json").read_text())
    assert config["refine"]["fold_bn"] and config["refine"]["bf16"]  # --fast is the default on CUDA
    peaks = json.loads((out / "run.json").read_text())["gpu_peak_GiB"]
    assert set(peaks) == {"teacher", "distill", "relabel", "evaluate"}
    assert all(0 < v < 80 for v in peaks.values()), peaks


def test_online_and_compact(first_run, data, tmp_path):
    teacher = first_run[1] / "teacher.pt"
    out = tmp_path / "online"
    assert main(["run", "--dataset", "imagefolder", "--data-dir", str(data), "--out", str(out),
                 "--teacher", str(teacher), "--labels", "compact", "--online", *TINY]) == 0
    # online students have no label folder: the 2 epochs (not the default 300) are in the name
    ev = json.loads((out / "distilled" / "eval_compact-online-e2_convnet3.json").read_text())
    assert ev["online"] and ev["label_bytes"] == 0 and ev["variant"] == "e2" and ev["epochs"] == 2
    assert not (out / "distilled" / "labels_compact").exists()


def test_bad_input_exits_2_before_work(data, tmp_path, capsys):
    def run(*a):
        return main(["run", "--out", str(tmp_path / "o"), *TINY, *a])

    assert run("--dataset", "mnist-ish", "--data-dir", str(data)) == 2
    assert run("--dataset", "imagefolder", "--data-dir", str(tmp_path / "nope")) == 2
    assert run("--dataset", "imagefolder", "--data-dir", str(data), "--labels", "dbr,hard") == 2
    assert run("--dataset", "imagefolder", "--data-dir", str(data), "--labels", "onehot", "--online") == 2
    assert run("--dataset", "imagefolder", "--data-dir", str(data), "--student", "no-such-net") == 2
    assert run("--dataset", "imagefolder", "--data-dir", str(data), "--ipc", "11") == 2  # 10 per class
    assert run("--dataset", "imagefolder", "--data-dir", str(data), "--mipc", "1") == 2  # pool too small
    assert run("--dataset", "imagefolder", "--data-dir", str(data), "--teacher", str(tmp_path / "t.pt")) == 2
    assert run("--dataset", "imagefolder", "--data-dir", str(data), "--crop-scale", "0", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 9 and all(e.startswith("nrrdd run: error: ") for e in err)
    assert not (tmp_path / "o" / "teacher.pt").exists()


def test_report_collects_eval_files(first_run, capsys, tmp_path):
    out = first_run[1]
    assert main(["report", str(out), "--out", str(tmp_path / "r.md")]) == 0
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "r.md").read_text()
    lines = printed.strip().splitlines()
    assert lines[0] == "| dataset | method | IPC | labels | student | top-1 (%) | label bytes |"
    assert len(lines) == 4  # header, rule, dbr, onehot
    assert "48 B (0.667× soft)" in printed
    assert main(["report", str(tmp_path / "empty")]) == 2


@pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file()
                    and not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte").is_file(),
                    reason=f"real Fashion-MNIST not installed at {DEBIAN_FASHION_MNIST} "
                           "(Debian package dataset-fashion-mnist)")
def test_real_fashion_mnist_smoke(tmp_path):
    """The whole pipeline on real Fashion-MNIST, shrunk to seconds (the student's top-1 is
    still measured on all 10,000 real test images, at 14 px to keep it quick)."""
    out = tmp_path / "fm"
    assert main(["run", "--dataset", "fashion-mnist", "--out", str(out), "--preset", "quick",
                 "--image-size", "14", "--teacher-train-images", "500", "--teacher-test-images", "200", "--ipc", "1",
                 "--iterations", "1", "--mipc", "4", "--epochs", "2", "--device", "cpu", "--quiet"]) == 0
    ev = json.loads((out / "distilled" / "eval_dbr_convnet3.json").read_text())
    assert ev["dataset"] == "fashion-mnist" and ev["num_images"] == 10
    assert abs(ev["top1"][0] * 100 - round(ev["top1"][0] * 100)) < 1e-6  # k / 10,000 test images
    assert json.loads((out / "distilled" / "labels_dbr" / "manifest.json").read_text())["bytes_stored"] == 10 * 2 * 4


def test_holdout_evaluation_keeps_the_scored_images_out(data, tmp_path):
    """--eval-split holdout: the students are scored on training images that distillation
    never saw (3 per class here), recorded as such; the test set is not touched."""
    from nrrdd.data import holdout_split

    out = tmp_path / "held"
    rc = main(["run", "--dataset", "imagefolder", "--data-dir", str(data), "--out", str(out), "--method",
               "random", "--labels", "dbr", "--eval-split", "holdout", "--holdout-per-class", "3",
               "--r", "0.3", *TINY])
    assert rc == 0
    run = json.loads((out / "run.json").read_text())
    ev = json.loads((out / "distilled" / "eval_dbr-r0.3_convnet3-holdout.json").read_text())
    assert run["eval_split"] == "holdout" and run["holdout_per_class"] == 3 and ev["eval_split"] == "holdout"
    assert ev["dbr_r"] == 0.3 and run["top1"]["dbr"] == ev["top1"]
    # 9 held-out images: the top-1 is a multiple of 100/9
    assert abs(ev["top1"][0] * 9 / 100 - round(ev["top1"][0] * 9 / 100)) < 1e-9
    cfg = json.loads((out / "distilled" / "config.json").read_text())
    assert cfg["holdout_per_class"] == 3
    train = load_split("imagefolder", data, "train", SIZE)
    _, held = holdout_split(train, 3)
    images = torch.load(out / "distilled" / "images.pt") * torch.tensor(cfg["std"]).view(1, -1, 1, 1) \
        + torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
    held_px = held.get(range(len(held)))
    dist = (images[:, None] - held_px[None]).abs().flatten(2).amax(2)  # (distilled, held)
    assert images.shape == (6, 1, SIZE, SIZE) and float(dist.min()) > 1e-3  # none is a held-out image
    # scoring a set made with the whole training set on the holdout is refused
    assert main(["evaluate", "--distilled", str(out / "distilled"), "--student", "convnet3", "--labels",
                 "onehot", "--eval-split", "holdout", "--holdout-per-class", "2", "--epochs", "1",
                 "--seeds", "1", "--device", "cpu", "--quiet"]) == 2


def test_no_label_refine_reaches_the_refinement(data, tmp_path):
    out = tmp_path / "nolr"
    assert main(["run", "--dataset", "imagefolder", "--data-dir", str(data), "--out", str(out), "--method", "nrr",
                 "--labels", "onehot", "--no-label-refine", "--cam-eps", "0.3", "--crop-scale", "0.5", "0.7",
                 *TINY]) == 0
    cfg = json.loads((out / "distilled" / "config.json").read_text())
    assert cfg["refine"]["label_refine"] is False and cfg["refine"]["cam_eps"] == 0.3
    assert (cfg["run"]["crop_min_scale"], cfg["run"]["crop_max_scale"]) == (0.5, 0.7)
    box = torch.load(out / "distilled" / "patches.pt")["box"].view(-1, 4).double()
    area = box[:, 2] * box[:, 3] / SIZE ** 2  # whole-pixel rounding: half a pixel each way
    assert float(area.min()) > 0.5 * (1 - 1 / SIZE) ** 2 and float(area.max()) < 0.7 * (1 + 1 / SIZE) ** 2
    log = [json.loads(line) for line in (out / "distilled" / "log.jsonl").read_text().splitlines()]
    assert log and all(r["lr"] == 0.0 for r in log)  # the L_lr term is off
    run = json.loads((out / "run.json").read_text())
    assert run["label_refine"] is False and run["cam_eps"] == 0.3 and run["crop_scale"] == [0.5, 0.7]


def test_alpha_lr_weights_the_label_refinement_term(data, tmp_path):
    out = tmp_path / "alr"
    assert main(["run", "--dataset", "imagefolder", "--data-dir", str(data), "--out", str(out), "--method", "nrr",
                 "--labels", "onehot", "--alpha-lr", "0.25", *TINY]) == 0
    cfg = json.loads((out / "distilled" / "config.json").read_text())
    assert cfg["refine"]["alpha_lr"] == 0.25 and cfg["refine"]["label_refine"] is True
    log = [json.loads(line) for line in (out / "distilled" / "log.jsonl").read_text().splitlines()]
    assert log and any(r["lr"] > 0 for r in log)
    for r in log:  # the logged total is CE + alpha_bn * L_bn + alpha_lr * L_lr
        assert r["total"] == pytest.approx(r["ce"] + cfg["refine"]["alpha_bn"] * r["bn"] + 0.25 * r["lr"],
                                           rel=1e-5)
    assert json.loads((out / "run.json").read_text())["alpha_lr"] == 0.25
    assert main(["run", "--dataset", "imagefolder", "--data-dir", str(data), "--out", str(tmp_path / "bad"),
                 "--alpha-lr", "-1", *TINY]) == 2
    assert not (tmp_path / "bad").exists()


def _copy_set(src, dest):
    """A distilled folder's set files copied by hand (the reference for --images-from)."""
    import shutil

    dest.mkdir(parents=True)
    for name in ("images.pt", "labels.pt", "patches.pt", "config.json"):
        shutil.copyfile(src / name, dest / name)
    return dest


def _relabel(dist, teacher):
    assert main(["relabel", "--distilled", str(dist), "--teacher", str(teacher), "--mode", "soft",
                 "--epochs", "2", "--quiet", "--device", "cpu"]) == 0
    return [(dist / "labels_soft" / f"epoch_{e:05d}.bin").read_bytes() for e in range(2)]


def test_images_from_labels_another_runs_set_with_this_teacher(first_run, data, tmp_path):
    """--images-from: another run's set (images, labels, patches) is copied unchanged and
    labelled by this run's teacher: the stored labels are byte for byte what `nrrdd relabel
    --teacher` writes for a copy of the set, and not what the set's own teacher gives."""
    from nrrdd.distilled_set import load_distilled

    src = _copy_set(first_run[1] / "distilled", tmp_path / "src")
    other = tmp_path / "other.pt"
    make_teacher(other, image_size=SIZE)
    out = tmp_path / "swap"
    args = ["run", "--dataset", "imagefolder", "--data-dir", str(data), "--out", str(out), "--images-from",
            str(src), "--teacher", str(other), "--labels", "soft", "--epochs", "2", "--seeds", "1",
            "--image-size", str(SIZE), "--device", "cpu", "--quiet"]
    assert main(args) == 0
    d = out / "distilled"
    for name in ("images.pt", "labels.pt"):
        assert torch.equal(torch.load(d / name), torch.load(src / name)), name
    assert (d / "patches.pt").read_bytes() == (src / "patches.pt").read_bytes()
    cfg, src_cfg = (json.loads((f / "config.json").read_text()) for f in (d, src))
    assert cfg.pop("images_from") == {"path": str(src.resolve()), "images_sha256": load_distilled(src).fingerprint()}
    assert cfg == src_cfg
    run = json.loads((out / "run.json").read_text())
    assert run["images_from"] == str(src.resolve()) and run["method"] == "nrr"
    assert run["teacher"]["path"] == str(other.resolve())
    # the images' teacher and the labels' teacher, told apart by their weights
    other_sha = load_teacher(other)[1]["sha256"]
    manifest = json.loads((d / "labels_soft" / "manifest.json").read_text())
    assert run["teacher"]["sha256"] == manifest["teacher"]["sha256"] == other_sha
    assert cfg["teacher"]["sha256"] == load_teacher(first_run[1] / "teacher.pt")[1]["sha256"] != other_sha
    assert (run["settings"]["ipc"], run["settings"]["factor"], run["settings"]["iterations"]) == (2, 1, 0)
    ev = json.loads((d / "eval_soft_convnet3.json").read_text())
    assert run["top1"]["soft"] == ev["top1"] and abs(ev["top1"][0] * 15 / 100 - round(ev["top1"][0] * 15 / 100)) < 1e-9
    stored = [(d / "labels_soft" / f"epoch_{e:05d}.bin").read_bytes() for e in range(2)]
    assert stored == _relabel(_copy_set(src, tmp_path / "by-other"), other)
    assert stored != _relabel(_copy_set(src, tmp_path / "by-own"), first_run[1] / "teacher.pt")
    # --resume keeps the copy; a source that changed since is refused
    assert main(args + ["--resume"]) == 0
    torch.save(torch.load(src / "images.pt") + 1, src / "images.pt")
    assert main(args + ["--resume"]) == 2


def test_images_from_refuses_flags_that_would_remake_the_set(first_run, data, tmp_path, capsys):
    src = first_run[1] / "distilled"

    def run(*a):
        return main(["run", "--dataset", "imagefolder", "--data-dir", str(data), "--out", str(tmp_path / "o"),
                     "--teacher", str(first_run[1] / "teacher.pt"), "--image-size", str(SIZE), "--device", "cpu",
                     "--quiet", *a])

    assert run("--images-from", str(tmp_path / "nope")) == 2
    assert run("--images-from", str(src), "--iterations", "3") == 2
    assert run("--images-from", str(src), "--ipc", "3") == 2  # made with IPC 2
    assert run("--images-from", str(src), "--method", "cidd") == 2  # made by nrr
    assert run("--images-from", str(src), "--factor", "2") == 2  # made with factor 1
    assert run("--images-from", str(src), "--eval-split", "holdout") == 2  # made without a holdout
    # a source inside --out: --force would delete it before the copy
    assert main(["run", "--dataset", "imagefolder", "--data-dir", str(data), "--out", str(first_run[1]),
                 "--images-from", str(src), "--force", "--image-size", str(SIZE), "--device", "cpu", "--quiet"]) == 2
    assert (src / "images.pt").is_file() and (first_run[1] / "teacher.pt").is_file()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 7 and all(e.startswith("nrrdd run: error: ") for e in err)
    assert "nope" in err[0] and "--iterations" in err[1] and "--ipc 2" in err[2] and "--method nrr" in err[3]
    assert not (tmp_path / "o").exists()


def test_a_teacher_with_other_normalisation_is_refused(first_run):
    """Relabelling feeds the stored (normalised) images to the teacher as they are: a
    teacher trained with another mean/std would read other pixels, so it is refused."""
    from nrrdd.distilled_set import load_distilled
    from nrrdd.errors import UsageError
    from nrrdd.relabel import check_teacher_fits

    ds = load_distilled(first_run[1] / "distilled")
    _, meta = load_teacher(first_run[1] / "teacher.pt", "cpu")
    check_teacher_fits(meta, ds)
    for key in ("mean", "std"):
        shifted = dict(meta, **{key: [v * 1.01 for v in meta[key]]})
        with pytest.raises(UsageError, match=key):
            check_teacher_fits(shifted, ds)


def test_stage_meter_adds_up_each_stage(monkeypatch):
    """StageMeter (run.json's seconds and gpu_peak_GiB): a stage entered twice (relabel,
    evaluate: once per label mode) adds its times; no GPU peaks on the CPU."""
    import time

    from nrrdd.devices import StageMeter

    ticks = iter([10.0, 12.5, 20.0, 21.0, 30.0, 30.25])
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks))
    meter = StageMeter("cpu")
    for stage in ("relabel", "distill", "relabel"):
        meter.start()
        meter.stop(stage)
    assert meter.seconds == {"relabel": 2.75, "distill": 1.0}
    assert meter.gpu_peaks() is None

"""``nrrdd distill`` end to end: outputs, reproducibility, resume, refusals; real-data smoke."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from nrrdd_tiny import FASHION_MNIST_DIR, TINY, make_teacher

from nrrdd.cli import main
from nrrdd.distill import DistillSettings, distill, refine_batches


def _args(data, teacher, out, *extra):
    return ["distill", "--dataset", "imagefolder", "--data-dir", str(data), "--teacher", str(teacher),
            "--ipc", "2", "--out", str(out), "--iterations", "3", "--mipc", "4", "--num-crop", "2", "--top-t", "2",
            "--batch-size", "4", "--log-every", "2", "--device", "cpu", "--seed", "1", "--quiet", *extra]


def _settings(data, teacher, out, **kw):
    base = dict(dataset="imagefolder", data_dir=str(data), teacher=str(teacher), ipc=2, out=str(out),
                iterations=3, mipc=4, num_crop=2, top_t=2, batch_size=4, log_every=2, seed=1, quiet=True)
    return DistillSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def full_run(folder_dir, teacher_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    assert main(_args(folder_dir, teacher_path, out)) == 0
    return out


def test_outputs(full_run):
    images, labels = torch.load(full_run / "images.pt"), torch.load(full_run / "labels.pt")
    assert images.shape == (6, 1, TINY, TINY) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 0, 1, 1, 2, 2]
    cfg = json.loads((full_run / "config.json").read_text())
    assert cfg["status"] == "done" and cfg["seed"] == 1 and cfg["ipc"] == 2 and cfg["num_classes"] == 3
    assert cfg["teacher"]["test_accuracy"] == 0.5 and cfg["teacher"]["path"].endswith("teacher.pt")
    assert cfg["versions"]["torch"] == torch.__version__ and "nrrdd_ext" in cfg["versions"]
    assert cfg["method"] == "nrr" and cfg["refine"]["cam_eps"] == 0.5 and cfg["refine"]["alpha_bn"] == 0.01
    for stage in ("load", "cidd", "refine", "write", "total"):
        assert cfg["timings"][stage] >= 0
    assert json.loads((full_run / "timings.json").read_text())["total"] > 0
    lo = (0 - 0.449) / 0.226
    hi = (1 - 0.449) / 0.226
    assert float(images.min()) >= lo - 1e-6 and float(images.max()) <= hi + 1e-6
    pngs = sorted(p.relative_to(full_run).as_posix() for p in (full_run / "images").rglob("*.png"))
    assert pngs == [f"images/c{c}/{i}.png" for c in range(3) for i in range(2)]
    from PIL import Image

    with Image.open(full_run / "images" / "c1" / "0.png") as im:
        assert im.size == (TINY, TINY)
        px = torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32))
    want = ((images[2, 0] * 0.226 + 0.449).clamp(0, 1) * 255)
    assert float((px - want).abs().max()) <= 1.0  # de-normalised, 8-bit
    for name in ("grid.png", "masks.png"):
        with Image.open(full_run / name) as im:
            assert im.size == (2 * (TINY + 2) + 2, 3 * (TINY + 2) + 2)  # 2 columns, one row per class, 2 px gaps
    log = [json.loads(line) for line in (full_run / "log.jsonl").read_text().splitlines()]
    # 6 images in batches of 4 -> 2 batches; iterations 2 and 3 logged in each
    assert [(r["batch"], r["iteration"]) for r in log] == [(0, 2), (0, 3), (1, 2), (1, 3)]
    assert all({"ce", "bn", "lr", "total"} <= set(r) for r in log)
    assert not (full_run / "partial").exists()


def test_fast_path_on_cpu_folds_and_tracks_the_plain_run(full_run, folder_dir, teacher_path, tmp_path):
    """--fast on the CPU folds the teacher's BatchNorms and runs it in channels_last (float32):
    the images equal the plain run's to float32 noise, and config.json records what was folded."""
    out = tmp_path / "fast"
    assert main(_args(folder_dir, teacher_path, out, "--fast")) == 0
    cfg = json.loads((out / "config.json").read_text())
    plain = json.loads((full_run / "config.json").read_text())
    assert cfg["run"]["fast"] is True and plain["run"]["fast"] is False and plain["fast_path"] is None
    assert cfg["refine"]["fold_bn"] and cfg["refine"]["channels_last"]
    assert not cfg["refine"]["bf16"] and not cfg["refine"]["cuda_graph"]
    assert not plain["refine"]["fold_bn"] and not plain["refine"]["channels_last"]
    fold = cfg["fast_path"]["fold_bn"]
    assert len(fold["folded"]) == 3 and not fold["kept"] and fold["check_error"] < 1e-5
    a, b = torch.load(out / "images.pt"), torch.load(full_run / "images.pt")
    assert float((a - b).abs().max()) < 1e-3
    # the fast setting is part of the run: resuming it with --no-fast is refused
    assert main(_args(folder_dir, teacher_path, out, "--no-fast", "--resume")) == 2


def test_patch_provenance(full_run, folder_dir):
    """patches.pt: for each image its 4 patches' real source images (all of the image's
    class), their crop boxes inside those images, and the teacher's confidences."""
    from nrrdd.data import load_split

    p = torch.load(full_run / "patches.pt")
    labels = torch.load(full_run / "labels.pt")
    assert p["source"].shape == (6, 4) and p["box"].shape == (6, 4, 4) and p["confidence"].shape == (6, 4)
    train = load_split("imagefolder", folder_dir, "train", TINY)
    assert torch.equal(train.labels[p["source"]], labels[:, None].expand(6, 4))
    x0, y0, w, h = p["box"].unbind(-1)
    assert bool(((x0 >= 0) & (y0 >= 0) & (w >= 1) & (h >= 1) & (x0 + w <= TINY) & (y0 + h <= TINY)).all())
    assert bool(((p["confidence"] >= 0) & (p["confidence"] <= 1)).all())


def test_batches_mix_classes():
    batches = refine_batches(3, 2, 4)
    assert [b.tolist() for b in batches] == [[0, 2, 4, 1], [3, 5]]


def test_interrupted_run_resumes_to_identical_images(folder_dir, teacher_path, full_run, tmp_path):
    out = tmp_path / "run"
    seen = []

    def stop_after_first_batch(stage, i):
        seen.append((stage, i))
        if stage == "refine":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(_settings(folder_dir, teacher_path, out), on_unit=stop_after_first_batch)
    assert seen == [("cidd", 0), ("cidd", 1), ("cidd", 2), ("refine", 0)]
    assert not (out / "images.pt").exists() and (out / "partial" / "refine" / "00000.pt").is_file()
    # without --resume the folder is refused, untouched
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(_args(folder_dir, teacher_path, out)) == 2
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    redone = []
    res = distill(_settings(folder_dir, teacher_path, out), resume=True,
                  on_unit=lambda s, i: redone.append((s, i)))
    assert redone == [("refine", 1)] and res.resumed_units == 4  # 3 classes + 1 batch reused
    assert torch.equal(torch.load(out / "images.pt"), torch.load(full_run / "images.pt"))  # same seed
    assert (out / "log.jsonl").read_text() == (full_run / "log.jsonl").read_text()
    # a finished run resumed again: nothing to do
    assert main(_args(folder_dir, teacher_path, out, "--resume")) == 0


def test_batch_interrupted_mid_refinement_resumes_from_its_state(folder_dir, teacher_path, full_run, tmp_path):
    """With a state saved after every iteration, stop batch 1 after its first iteration:
    --resume continues it from partial/refine/00001.state.pt to the same images and log."""
    out = tmp_path / "run"

    def stop_in_batch_1(stage, i):
        if (stage, i) == ("refine_state", 1):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(_settings(folder_dir, teacher_path, out), on_unit=stop_in_batch_1, checkpoint_every_s=0)
    state = torch.load(out / "partial" / "refine" / "00001.state.pt")
    full = torch.load(full_run / "images.pt")
    assert state["step"] == 1 and state["iterations"] == 3
    assert state["x"].shape == (len(refine_batches(3, 2, 4)[1]), *full.shape[1:])
    assert not (out / "partial" / "refine" / "00000.state.pt").exists()  # batch 0 finished: state gone
    redone = []
    res = distill(_settings(folder_dir, teacher_path, out), resume=True, checkpoint_every_s=0,
                  on_unit=lambda s, i: redone.append((s, i)))
    assert redone == [("refine_state", 1), ("refine", 1)]  # iterations 2 and 3 of batch 1 only
    assert res.timings["resumed_iterations"] == 1
    assert torch.equal(torch.load(out / "images.pt"), full)
    assert (out / "log.jsonl").read_text() == (full_run / "log.jsonl").read_text()
    assert not (out / "partial").exists()


def test_other_seed_differs_and_force_overwrites(folder_dir, teacher_path, full_run, tmp_path):
    out = tmp_path / "run"
    assert main(_args(folder_dir, teacher_path, out)[:-3] + ["--seed", "2", "--quiet"]) == 0
    a = torch.load(out / "images.pt")
    assert not torch.equal(a, torch.load(full_run / "images.pt"))
    assert main(_args(folder_dir, teacher_path, out, "--force")) == 0  # seed 1 again
    assert torch.equal(torch.load(out / "images.pt"), torch.load(full_run / "images.pt"))


def test_cidd_only_with_highest_selection(folder_dir, teacher_path, tmp_path):
    out = tmp_path / "rded"
    assert main(_args(folder_dir, teacher_path, out, "--iterations", "0", "--select", "highest")) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"] == "rded" and (out / "masks.png").is_file()
    assert (out / "log.jsonl").read_text() == ""


def _snapshot(folder: Path):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def occupied(full_run, tmp_path):
    """An output folder holding a finished run (a copy of full_run)."""
    import shutil

    out = tmp_path / "occupied"
    shutil.copytree(full_run, out)
    return out


def test_bad_inputs_exit_2_and_touch_nothing(folder_dir, teacher_path, occupied, tmp_path, capsys):
    wrong_classes = make_teacher(tmp_path / "t5.pt", num_classes=5, image_size=TINY)
    wrong_channels = make_teacher(tmp_path / "t3ch.pt", in_channels=3, image_size=TINY)
    wrong_data = make_teacher(tmp_path / "tfm.pt", dataset="fashion-mnist", image_size=TINY)
    torch.save({"format": "nrrdd-teacher-v1", "arch": "no_such_arch_9", "num_classes": 3, "in_channels": 1,
                "image_size": TINY, "state_dict": {}}, tmp_path / "tarch.pt")
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(1)}, plain)
    base = _args(folder_dir, teacher_path, occupied)
    cases = {
        "missing data folder": _args(tmp_path / "no-data", teacher_path, occupied, "--resume"),
        "unknown arch": _args(folder_dir, tmp_path / "tarch.pt", occupied, "--force"),
        "unknown plain arch": _args(folder_dir, plain, occupied, "--force", "--teacher-arch", "bogus_net"),
        "ipc too large": base[:base.index("--ipc") + 1] + ["7"] + base[base.index("--ipc") + 2:] + ["--force"],
        "class count": _args(folder_dir, wrong_classes, occupied, "--force"),
        "channels": _args(folder_dir, wrong_channels, occupied, "--force"),
        "teacher of another dataset": _args(folder_dir, wrong_data, occupied, "--force"),
        "missing teacher": _args(folder_dir, tmp_path / "none.pt", occupied, "--force"),
        "different run": _args(folder_dir, teacher_path, occupied, "--seed", "9"),
        "different run, resume": _args(folder_dir, teacher_path, occupied, "--seed", "9", "--resume"),
        "same run, no flag": base,
        "resume and force": base + ["--resume", "--force"],
        "pool too small": _args(folder_dir, teacher_path, occupied, "--force", "--factor", "3"),
        "cuda graph on cpu": _args(folder_dir, teacher_path, occupied, "--force", "--cuda-graph"),
        "crop scale upside down": _args(folder_dir, teacher_path, occupied, "--force", "--crop-scale", "0.6", "0.2"),
        "crop scale above 1": _args(folder_dir, teacher_path, occupied, "--force", "--crop-scale", "0.5", "1.5"),
    }
    before = _snapshot(occupied)
    for what, argv in cases.items():
        capsys.readouterr()
        assert main(argv) == 2, what
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("nrrdd distill: error:"), (what, err)
        assert _snapshot(occupied) == before, what
    with pytest.raises(SystemExit) as e:  # argparse's own refusals are exit 2 too
        main(base + ["--mask", "sometimes"])
    assert e.value.code == 2


def test_folder_with_other_files_is_refused(folder_dir, teacher_path, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(_args(folder_dir, teacher_path, out)) == 2
    assert main(_args(folder_dir, teacher_path, out, "--resume")) == 2
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason="real Fashion-MNIST not installed (Debian package dataset-fashion-mnist)")
def test_real_fashion_mnist_smoke(tmp_path):
    """train-teacher's library path on a 400-image slice, then distill on the real train set."""
    from nrrdd.data import TensorImageSet, load_split
    from nrrdd.teacher import save_teacher, train_teacher

    full = load_split("fashion-mnist", None, "train")
    sl = TensorImageSet("fashion-mnist", full.classes, full.labels[:400], full.pixels[:400], None,
                        full.mean, full.std)
    test = TensorImageSet("fashion-mnist", full.classes, full.labels[400:600], full.pixels[400:600], None,
                          full.mean, full.std)
    model, meta = train_teacher("convnet3", sl, test, epochs=1, batch_size=100, quiet=True)
    assert meta["test_accuracy"] > 0.15  # above chance (0.1) after 4 steps
    save_teacher(model, meta, tmp_path / "t.pt")
    out = tmp_path / "fm"
    argv = ["distill", "--dataset", "fashion-mnist", "--teacher", str(tmp_path / "t.pt"), "--ipc", "1",
            "--out", str(out), "--iterations", "2", "--mipc", "4", "--num-crop", "2", "--batch-size", "10",
            "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    images = torch.load(out / "images.pt")
    assert images.shape == (10, 1, 28, 28) and torch.load(out / "labels.pt").tolist() == list(range(10))
    assert (out / "images" / "T-shirt_top" / "0.png").is_file()
    assert (out / "images" / "Ankle boot" / "0.png").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data_dir"] is None and cfg["dataset"] == "fashion-mnist" and cfg["mean"] == [0.286]


def test_holdout_per_class_keeps_the_held_images_out_of_cidd(folder_dir, teacher_path, tmp_path):
    """`nrrdd distill --holdout-per-class N`: no patch comes from a held-out image, and the
    set is recorded as made with N (what `evaluate --eval-split holdout` checks)."""
    from nrrdd.data import holdout_split, load_split

    out = tmp_path / "held"
    assert main(_args(folder_dir, teacher_path, out, "--holdout-per-class", "3", "--iterations", "0",
                      "--factor", "1")) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["holdout_per_class"] == 3
    train = load_split("imagefolder", str(folder_dir), "train", cfg["image_size"])
    held = holdout_split(train, 3)[1]
    held_idx = set(held.split_index(range(len(held))).tolist())
    sources = torch.load(out / "patches.pt")["source"].flatten().tolist()
    assert len(held_idx) == 3 * train.num_classes and len(sources) == 2 * train.num_classes
    assert not held_idx & set(sources)
    assert main(_args(folder_dir, teacher_path, tmp_path / "bad", "--holdout-per-class", "-1")) == 2


def test_crop_scale_cli_default_is_the_library_default():
    from nrrdd.cidd import CROP_SCALE
    from nrrdd.cli import build_parser

    for command, argv in (("distill", ["--dataset", "x", "--teacher", "t", "--ipc", "1", "--out", "o"]),
                          ("run", ["--dataset", "x"])):
        assert tuple(build_parser(command).parse_args([command, *argv]).crop_scale) == CROP_SCALE


def _weights_sha256_by_hand(path) -> str:
    """sha256 over the checkpoint's state dict in name order: dtype, shape, then bytes."""
    import hashlib

    state = torch.load(path, weights_only=True)["state_dict"]
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _interrupted_at_refinement(data, teacher, out):
    """A distill run stopped as its first refinement batch finished."""
    def stop(stage, i):
        if stage == "refine":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(_settings(data, teacher, out), on_unit=stop)
    return out


def test_resume_refuses_other_teacher_weights_at_the_same_path(folder_dir, teacher_path, full_run, tmp_path):
    """A teacher retrained or replaced at the same path must not finish a run begun under
    the old weights: config.json records the weights' sha256, and --resume compares it."""
    import shutil

    from nrrdd_tiny import make_teacher

    teacher = tmp_path / "teacher.pt"
    shutil.copy(teacher_path, teacher)
    out = _interrupted_at_refinement(folder_dir, teacher, tmp_path / "run")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["teacher"]["sha256"] == cfg["run"]["teacher_sha256"] == _weights_sha256_by_hand(teacher)
    make_teacher(teacher, image_size=TINY, seed=1 + np.random.randint(1000))  # other weights, same path
    assert _weights_sha256_by_hand(teacher) != cfg["run"]["teacher_sha256"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(Exception, match="other teacher weights"):
        distill(_settings(folder_dir, teacher, out), resume=True)
    assert main(_args(folder_dir, teacher, out, "--resume")) == 2
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # untouched
    # the weights it was begun with: it resumes, to the uninterrupted run's images
    shutil.copy(teacher_path, teacher)
    assert main(_args(folder_dir, teacher, out, "--resume")) == 0
    assert torch.equal(torch.load(out / "images.pt"), torch.load(full_run / "images.pt"))


def test_run_begun_before_the_teacher_fingerprint_still_resumes(folder_dir, teacher_path, full_run, tmp_path):
    """config.json of an older version has no teacher_sha256: the path alone is compared."""
    out = _interrupted_at_refinement(folder_dir, teacher_path, tmp_path / "run")
    cfg = json.loads((out / "config.json").read_text())
    del cfg["run"]["teacher_sha256"]
    (out / "config.json").write_text(json.dumps(cfg))
    assert main(_args(folder_dir, teacher_path, out, "--resume")) == 0
    assert torch.equal(torch.load(out / "images.pt"), torch.load(full_run / "images.pt"))

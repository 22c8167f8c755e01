"""``torchrun`` runs of distill, relabel and evaluate on the CPU (gloo, 127.0.0.1 only).

Each multi-rank run is a real ``python -m torch.distributed.run --nproc-per-node N
-m nrrdd ...`` subprocess; each 1-rank reference runs in this process (one
thread, as torchrun gives each of its workers). Everything is tiny: a test takes
seconds, the torchrun start-up most of them.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from nrrdd_tiny import TINY, make_imagefolder, make_teacher

from nrrdd.cli import main
from nrrdd.distill import DistillSettings, distill

CLASSES = 4
TIMEOUT_S = 120  # a hang would be caught here; a passing run takes seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", NRRDD_DIST_TIMEOUT="60", PYTHONUNBUFFERED="1")
    if any(name == "lo" for _, name in socket.if_nameindex()):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def _run(cmd: list) -> subprocess.CompletedProcess:
    # an empty working folder: `python -m` puts it first on sys.path, and the checkout's
    # source nrrdd_ext/ must not shadow the installed, compiled package
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run(cmd, env=_env(), cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)


def torchrun(nproc: int, *args: str, script: Path | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc -m nrrdd args`` (or ``script args``) on loopback."""
    target = [str(script)] if script else ["-m", "nrrdd"]
    return _run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
                 str(nproc), "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                 *target, *args])


@contextlib.contextmanager
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    make_imagefolder(root / "data", classes=CLASSES, train_per_class=6, size=TINY)
    make_teacher(root / "teacher.pt", num_classes=CLASSES, image_size=TINY)
    return root


def _distill_args(root: Path, out: Path, *extra: str) -> list:
    # 4 classes x ipc 2 = 8 images in refinement batches of 3, 3, 2
    return ["distill", "--dataset", "imagefolder", "--data-dir", str(root / "data"),
            "--teacher", str(root / "teacher.pt"), "--ipc", "2", "--out", str(out), "--iterations", "3",
            "--mipc", "4", "--num-crop", "2", "--top-t", "2", "--batch-size", "3", "--log-every", "2",
            "--device", "cpu", "--seed", "3", "--quiet", *extra]


@pytest.fixture(scope="module")
def one_rank(setup):
    """The 1-rank reference distilled folder."""
    out = setup / "one"
    with one_thread():
        assert main(_distill_args(setup, out)) == 0
    return out


def _same_distilled(a: Path, b: Path) -> None:
    for name in ("images.pt", "labels.pt"):
        assert torch.equal(torch.load(a / name), torch.load(b / name)), name
    assert (a / "log.jsonl").read_text() == (b / "log.jsonl").read_text()
    assert sorted(p.relative_to(a).as_posix() for p in (a / "images").rglob("*.png")) == \
        sorted(p.relative_to(b).as_posix() for p in (b / "images").rglob("*.png"))
    assert not (b / "partial").exists()


def test_distill_two_ranks_equals_one(setup, one_rank):
    out = setup / "two"
    proc = torchrun(2, *_distill_args(setup, out))
    _ok(proc)
    _same_distilled(one_rank, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["status"] == "done" and cfg["world_size"] == 2
    for name in ("grid.png", "masks.png", "timings.json"):
        assert (out / name).is_file()
    assert proc.stdout.count("wrote 8 images") <= 1  # rank 0 only (and --quiet)


def test_distill_resume_on_two_ranks(setup, one_rank, tmp_path):
    """A single-process run stopped after two CIDD classes, resumed by 2 ranks: the same images."""
    out = tmp_path / "run"

    def stop(stage, i):
        if (stage, i) == ("cidd", 1):
            raise KeyboardInterrupt

    settings = DistillSettings(dataset="imagefolder", data_dir=str(setup / "data"),
                               teacher=str(setup / "teacher.pt"), ipc=2, out=str(out), iterations=3,
                               mipc=4, num_crop=2, top_t=2, batch_size=3, log_every=2, seed=3, quiet=True)
    with one_thread(), pytest.raises(KeyboardInterrupt):
        distill(settings, on_unit=stop)
    assert sorted(p.name for p in (out / "partial" / "cidd").iterdir()) == ["00000.pt", "00001.pt"]
    _ok(torchrun(2, *_distill_args(setup, out, "--resume")))
    _same_distilled(one_rank, out)
    assert json.loads((out / "timings.json").read_text())["resumed_units"] == 2


def _relabel_args(dist: Path, *extra: str) -> list:
    return ["relabel", "--distilled", str(dist), "--mode", "dbr", "--epochs", "3", "--seed", "7",
            "--batch-size", "3", "--device", "cpu", "--quiet", *extra]


def test_relabel_two_ranks_byte_identical(one_rank, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        shutil.copytree(one_rank, d)
    with one_thread():
        assert main(_relabel_args(a)) == 0
    _ok(torchrun(2, *_relabel_args(b)))
    names = sorted(p.name for p in (a / "labels_dbr").glob("epoch_*.bin"))
    assert names == [f"epoch_{e:05d}.bin" for e in range(3)]
    assert sorted(p.name for p in (b / "labels_dbr").glob("epoch_*.bin")) == names
    for n in names:
        assert (a / "labels_dbr" / n).read_bytes() == (b / "labels_dbr" / n).read_bytes(), n
    ma = json.loads((a / "labels_dbr" / "manifest.json").read_text())
    mb = json.loads((b / "labels_dbr" / "manifest.json").read_text())
    assert mb["complete"] and mb["epochs_done"] == 3 and mb["world_size"] == 2
    skip = ("seconds", "world_size", "teacher")
    assert {k: v for k, v in ma.items() if k not in skip} == {k: v for k, v in mb.items() if k not in skip}


TRAIN_SCRIPT = '''
import sys
from pathlib import Path

import torch
from nrrdd import distributed as D
from nrrdd import labels as L
from nrrdd.data import load_split
from nrrdd.distilled_set import load_distilled
from nrrdd.augment import AugmentConfig
from nrrdd.student import StoredLabels, train_student

D.init_from_env("cpu")
dist, ckpt = sys.argv[1], sys.argv[2]
ds = load_distilled(dist)
store = L.LabelStore(dist, "dbr")
m = store.manifest()
test = load_split("imagefolder", ds.config["data_dir"], "test", image_size=ds.image_size)
run = train_student(ds, "convnet3", "dbr", StoredLabels(store, m, "cpu"),
                    AugmentConfig.from_dict(m["augment"]), m["seed"], m["epochs"], 0, ds.num_classes,
                    test, ds.config["mean"], ds.config["std"], checkpoint=Path(ckpt),
                    settings={}, quiet=True)
if D.is_main():
    torch.save({"loss": run.final_loss, "top1": run.top1}, ckpt + ".run")
D.destroy()
'''


def test_evaluate_two_ranks_matches_one(one_rank, tmp_path):
    """DDP over 2 ranks (uneven slices: global batches of 3, 3, 2) reports, and its student
    after 2 epochs equals the 1-rank student up to float rounding."""
    dist = tmp_path / "d"
    shutil.copytree(one_rank, dist)
    with one_thread():
        assert main(_relabel_args(dist, "--epochs", "2")) == 0
    ev = ["evaluate", "--distilled", str(dist), "--student", "convnet3", "--labels", "dbr",
          "--seeds", "1", "--device", "cpu", "--quiet"]
    proc = torchrun(2, *ev)
    _ok(proc)
    res = json.loads((dist / "eval_dbr_convnet3.json").read_text())
    assert len(res["top1"]) == 1 and 0 <= res["top1_mean"] <= 100 and res["world_size"] == 2
    assert "top-1" in proc.stdout and proc.stdout.count("top-1") == 1  # rank 0 reports, once

    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    _ok(torchrun(2, str(dist), str(tmp_path / "two.pt"), script=script))
    _ok(_run([sys.executable, str(script), str(dist), str(tmp_path / "one.pt")]))
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert a["epoch"] == b["epoch"] == 2
    # The bias of a conv that feeds a BatchNorm has an exactly-zero gradient, so its
    # float noise, which Adam normalises to steps of size ~lr, decides where it (and the
    # running mean that follows it) drifts: those are left out; every other number is
    # the single-process one.
    noise = {f"features.{4 * d}.bias" for d in range(3)}
    for k, v in a["model"].items():
        if k in noise or k.endswith("running_mean"):
            continue
        if v.is_floating_point():
            torch.testing.assert_close(b["model"][k], v, rtol=1e-3, atol=1e-4, msg=k)
        else:
            assert torch.equal(b["model"][k], v), k
    ra, rb = torch.load(tmp_path / "one.pt.run"), torch.load(tmp_path / "two.pt.run")
    assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4)


def test_failing_rank_stops_the_job(setup, tmp_path):
    """Rank 1 alone reads a corrupt CIDD file (its refinement batch holds classes 2 and 3):
    it raises, and the whole job exits non-zero in bounded time, rank 0 not left waiting."""
    out = tmp_path / "run"
    base = ["--ipc", "1", "--batch-size", "2"]  # batches [0, 1] (rank 0) and [2, 3] (rank 1)
    args = _distill_args(setup, out)
    for flag, value in zip(base[::2], base[1::2]):
        args[args.index(flag) + 1] = value

    def stop(stage, i):
        if stage == "cidd" and i == CLASSES - 1:
            raise KeyboardInterrupt

    settings = DistillSettings(dataset="imagefolder", data_dir=str(setup / "data"),
                               teacher=str(setup / "teacher.pt"), ipc=1, out=str(out), iterations=3,
                               mipc=4, num_crop=2, top_t=2, batch_size=2, log_every=2, seed=3, quiet=True)
    with one_thread(), pytest.raises(KeyboardInterrupt):
        distill(settings, on_unit=stop)
    (out / "partial" / "cidd" / f"{CLASSES - 1:05d}.pt").write_bytes(b"not a torch file")
    t0 = time.monotonic()
    proc = torchrun(2, *args, "--resume")
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert elapsed < TIMEOUT_S
    log = proc.stdout + proc.stderr
    assert "cannot read" in log and "00003.pt" in log, log[-3000:]  # the failing rank's error
    assert "rank      : 1" in log or "local_rank: 1" in log, log[-3000:]  # torchrun names it
    assert not (out / "images.pt").exists()

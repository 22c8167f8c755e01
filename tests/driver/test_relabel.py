"""Relabeling (nrrdd.relabel, nrrdd.labels, ``nrrdd relabel``): sizes, replay, manifest, resume, errors."""
from __future__ import annotations

import json
import random

import pytest
import torch

import nrrdd_ext
from nrrdd import labels as L
from nrrdd.augment import AugmentConfig, num_batches, replay_batch
from nrrdd.cli import main
from nrrdd.distilled_set import load_distilled
from nrrdd.relabel import relabel
from nrrdd.teacher import load_teacher
from nrrdd_toy import fresh_seed, make_distilled, make_teacher

CLASSES, IPC, SIZE = 3, 5, 16  # 15 images


@pytest.fixture
def setup(tmp_path):
    make_teacher(tmp_path / "teacher.pt", CLASSES, 1, SIZE)
    make_distilled(tmp_path / "dist", tmp_path / "teacher.pt", ipc=IPC, num_classes=CLASSES, image_size=SIZE)
    return tmp_path


def _relabel(dist, mode, epochs, seed, *extra):
    return main(["relabel", "--distilled", str(dist), "--mode", mode, "--epochs", str(epochs),
                 "--seed", str(seed), "--batch-size", "4", "--device", "cpu", "--quiet", *extra])


@pytest.mark.parametrize("mode,per_image", [("dbr", 4), ("soft", 2 * CLASSES), ("compact", 8), ("onehot", 0)])
def test_storage_sizes_and_manifest(setup, mode, per_image):
    dist, epochs, seed = setup / "dist", random.randint(2, 4), fresh_seed()
    assert _relabel(dist, mode, epochs, seed) == 0
    folder = dist / f"labels_{mode}"
    m = json.loads((folder / "manifest.json").read_text())
    n = CLASSES * IPC
    shards = sorted(folder.glob("epoch_*.bin"))
    if mode == "onehot":
        assert shards == []
    else:
        assert [p.name for p in shards] == [f"epoch_{e:05d}.bin" for e in range(epochs)]
        # the file is exactly the payload: per_image bytes for each image
        assert all(p.stat().st_size == n * per_image for p in shards)
    assert m["mode"] == mode and m["seed"] == seed and m["epochs"] == epochs and m["complete"]
    assert m["batch_size"] == 4 and m["augment"]["batch_size"] == 4
    assert m["num_images"] == n and m["num_classes"] == CLASSES
    assert m["bytes_per_image_per_epoch"] == per_image
    assert m["bytes_stored"] == n * epochs * per_image == m["bytes_on_disk"]
    assert m["bytes_per_image"] == epochs * per_image
    assert m["soft_bytes"] == n * epochs * CLASSES * 2
    assert m["ratio_to_soft"] == pytest.approx(per_image / (2 * CLASSES))
    if mode == "dbr":
        assert m["numbers_per_image_per_epoch"] == 2  # the paper's two numbers per image per epoch
        assert m["fields"] == [{"name": "d", "dtype": "float16", "width": 2}]
    assert m["images_sha256"] == load_distilled(dist).fingerprint()
    assert m["augment"]["min_scale"] == pytest.approx(0.5)  # 1/factor of the toy set (factor 2)


def test_replay_recomputes_the_stored_teacher_numbers(setup):
    dist, seed, epochs = setup / "dist", fresh_seed(), 5
    for mode in ("dbr", "soft", "compact"):
        assert _relabel(dist, mode, epochs, seed) == 0
    ds = load_distilled(dist)
    teacher, meta = load_teacher(setup / "teacher.pt")
    cfg = AugmentConfig.from_dict(json.loads((dist / "labels_dbr" / "manifest.json").read_text())["augment"])
    rng = random.Random(seed)
    stores = {m: L.LabelStore(dist, m) for m in ("dbr", "soft", "compact")}
    for _ in range(5):
        e, b = rng.randrange(epochs), rng.randrange(num_batches(len(ds), cfg.batch_size))
        mb = replay_batch(ds.images, ds.labels, cfg, seed, e, b)
        with torch.no_grad():
            logits = teacher(mb.x)
        # dbr: the two distances of Eq. 8, by the op and by the plain-PyTorch reference
        stored = stores["dbr"].read_epoch(e, len(ds), L.fields("dbr", CLASSES))["d"][mb.indices]
        d_org, d_aug = nrrdd_ext.dbr_distances(logits, mb.y_org, mb.y_aug)
        assert torch.equal(stored, torch.stack([d_org, d_aug], 1).half())
        r_org, r_aug = nrrdd_ext.reference.dbr_distances(logits.double(), mb.y_org, mb.y_aug)
        assert torch.allclose(stored.double(), torch.stack([r_org, r_aug], 1), rtol=2e-3, atol=2e-3)
        soft = stores["soft"].read_epoch(e, len(ds), L.fields("soft", CLASSES))["logits"][mb.indices]
        assert torch.equal(soft, logits.half())
        comp = stores["compact"].read_epoch(e, len(ds), L.fields("compact", CLASSES))
        p = torch.softmax(logits / 20.0, 1)
        top = p.topk(2, 1)
        assert torch.equal(comp["cls"][mb.indices].long(), top.indices)
        assert torch.equal(comp["prob"][mb.indices], top.values.half())


@pytest.mark.cuda
def test_relabel_on_cuda_stores_the_teachers_numbers(setup):
    """`nrrdd relabel --device cuda` stores what the teacher says of the replayed
    batches, recomputed here on the CPU (TF32 convolutions on the GPU: 1e-2)."""
    dist, seed, epochs = setup / "dist", fresh_seed(), 3
    for mode in ("dbr", "soft"):
        assert main(["relabel", "--distilled", str(dist), "--mode", mode, "--epochs", str(epochs),
                     "--seed", str(seed), "--batch-size", "4", "--device", "cuda", "--quiet"]) == 0
    ds = load_distilled(dist)
    teacher, _ = load_teacher(setup / "teacher.pt")
    cfg = AugmentConfig.from_dict(json.loads((dist / "labels_dbr" / "manifest.json").read_text())["augment"])
    dbr, soft = L.LabelStore(dist, "dbr"), L.LabelStore(dist, "soft")
    for e in range(epochs):
        for b in range(num_batches(len(ds), cfg.batch_size)):
            mb = replay_batch(ds.images, ds.labels, cfg, seed, e, b)
            with torch.no_grad():
                logits = teacher(mb.x).double()
            r_org, r_aug = nrrdd_ext.reference.dbr_distances(logits, mb.y_org, mb.y_aug)
            stored = dbr.read_epoch(e, len(ds), L.fields("dbr", CLASSES))["d"][mb.indices]
            assert torch.allclose(stored.double(), torch.stack([r_org, r_aug], 1), rtol=1e-2, atol=1e-2)
            got = soft.read_epoch(e, len(ds), L.fields("soft", CLASSES))["logits"][mb.indices]
            assert torch.allclose(got.double(), logits, rtol=1e-2, atol=1e-2)


def test_resume_continues_after_the_last_finished_epoch(setup, monkeypatch):
    dist, seed, epochs = setup / "dist", fresh_seed(), 5
    calls = {"n": 0}
    real_write = L.LabelStore.write_epoch

    def failing_write(self, epoch, arrays, flds):
        if epoch == 3:
            raise KeyboardInterrupt
        return real_write(self, epoch, arrays, flds)

    monkeypatch.setattr(L.LabelStore, "write_epoch", failing_write)
    with pytest.raises(KeyboardInterrupt):
        _relabel(dist, "dbr", epochs, seed)
    monkeypatch.setattr(L.LabelStore, "write_epoch", real_write)
    m = json.loads((dist / "labels_dbr" / "manifest.json").read_text())
    assert m["epochs_done"] == 3 and not m["complete"]
    # an incomplete folder is refused by evaluate, and by relabel without --resume
    assert _relabel(dist, "dbr", epochs, seed) == 2
    teacher, meta = load_teacher(setup / "teacher.pt")
    hook = teacher.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    m = relabel(dist, teacher, meta, "dbr", epochs, seed=seed,
                augment=AugmentConfig(batch_size=4, min_scale=0.5), resume=True, quiet=True)
    hook.remove()
    assert m["complete"] and m["epochs_done"] == epochs
    assert calls["n"] == 2 * num_batches(CLASSES * IPC, 4)  # only epochs 3 and 4 were labelled
    resumed = [(dist / "labels_dbr" / f"epoch_{e:05d}.bin").read_bytes() for e in range(epochs)]
    # the same labels as an uninterrupted run
    assert _relabel(dist, "dbr", epochs, seed, "--force") == 0
    fresh = [(dist / "labels_dbr" / f"epoch_{e:05d}.bin").read_bytes() for e in range(epochs)]
    assert resumed == fresh


def test_bad_input_exits_2(setup, tmp_path, capsys):
    dist, seed = setup / "dist", fresh_seed()
    assert _relabel(dist, "dbr", 2, seed) == 0
    assert _relabel(dist, "dbr", 2, seed) == 2  # exists: needs --resume or --force
    assert _relabel(dist, "dbr", 3, seed, "--resume") == 2  # other epoch count
    assert _relabel(dist, "dbr", 2, seed + 1, "--resume") == 2  # other seed
    assert _relabel(dist, "dbr", 2, seed, "--resume") == 0  # same settings: nothing to do
    assert _relabel(tmp_path / "nowhere", "dbr", 2, seed) == 2
    assert _relabel(dist, "soft", 0, seed) == 2
    # a teacher that does not fit: 3-channel input, or another class count
    make_teacher(tmp_path / "rgb.pt", CLASSES, 3, SIZE)
    assert _relabel(dist, "soft", 2, seed, "--teacher", str(tmp_path / "rgb.pt")) == 2
    make_teacher(tmp_path / "wide.pt", CLASSES + 2, 1, SIZE)
    assert _relabel(dist, "soft", 2, seed, "--teacher", str(tmp_path / "wide.pt")) == 2
    assert _relabel(dist, "soft", 2, seed, "--teacher", str(tmp_path / "missing.pt")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("nrrdd relabel: error: ") for line in err)
    assert not (dist / "labels_soft").exists()


def test_relabel_command_reads_the_teacher_from_config(setup, capsys):
    dist = setup / "dist"
    assert _relabel(dist, "dbr", 2, 0) == 0
    out = capsys.readouterr().out
    assert "dbr labels for 15 images x 2 epochs: 120 bytes (4 per image per epoch" in out


def test_resume_refuses_labels_of_other_teacher_weights(setup, capsys):
    """A teacher retrained at the same path: --resume refuses to add its labels to the old
    teacher's (the manifest records the weights' sha256); the old weights resume."""
    import shutil

    dist, seed = setup / "dist", fresh_seed()
    shutil.copy(setup / "teacher.pt", setup / "teacher_orig.pt")
    assert _relabel(dist, "soft", 2, seed) == 0
    m = json.loads((dist / "labels_soft" / "manifest.json").read_text())
    assert m["teacher"]["sha256"] == load_teacher(setup / "teacher.pt")[1]["sha256"]
    shards = {p.name: p.read_bytes() for p in (dist / "labels_soft").glob("epoch_*.bin")}
    make_teacher(setup / "teacher.pt", CLASSES, 1, SIZE, seed=seed + 1)  # other weights, same path
    assert load_teacher(setup / "teacher.pt")[1]["sha256"] != m["teacher"]["sha256"]
    capsys.readouterr()
    assert _relabel(dist, "soft", 2, seed, "--resume") == 2
    assert "other settings" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (dist / "labels_soft").glob("epoch_*.bin")} == shards
    shutil.copy(setup / "teacher_orig.pt", setup / "teacher.pt")
    assert _relabel(dist, "soft", 2, seed, "--resume") == 0
    assert {p.name: p.read_bytes() for p in (dist / "labels_soft").glob("epoch_*.bin")} == shards

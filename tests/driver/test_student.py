"""Student evaluation (nrrdd.student, ``nrrdd evaluate``): the loss per mode, eval json, resume, errors."""
from __future__ import annotations

import json
import statistics

import pytest
import torch
import torch.nn.functional as F

import nrrdd_ext
from nrrdd import labels as L
from nrrdd.augment import AugmentConfig, replay_batch
from nrrdd.cli import main
from nrrdd.data import load_split
from nrrdd.distilled_set import load_distilled
from nrrdd.errors import UsageError
from nrrdd.student import StoredLabels, student_loss, train_student
from nrrdd.teacher import load_teacher
from nrrdd_toy import fresh_seed, make_distilled, make_imagefolder, make_teacher

CLASSES, IPC, SIZE = 3, 4, 16


@pytest.fixture
def setup(tmp_path):
    make_imagefolder(tmp_path / "data", CLASSES, 4, 5, SIZE)
    make_teacher(tmp_path / "teacher.pt", CLASSES, 1, SIZE)
    make_distilled(tmp_path / "dist", tmp_path / "teacher.pt", tmp_path / "data", IPC, CLASSES, 1, SIZE)
    return tmp_path


def _batch(classes=7, n=12):
    g = torch.Generator().manual_seed(fresh_seed())
    images = torch.randn(n, 1, 10, 10, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    mb = replay_batch(images, labels, AugmentConfig(batch_size=n), fresh_seed(), 0, 0)
    teacher_logits = 3 * torch.randn(n, classes, generator=g)
    student_logits = torch.randn(n, classes, generator=g, dtype=torch.float64).float().requires_grad_()
    return mb, teacher_logits, student_logits


def test_dbr_loss_is_eq_10_on_the_stored_distances():
    mb, t, s = _batch()
    tg = L.teacher_targets("dbr", t, mb.y_org, mb.y_aug, 20.0)
    assert tg["d"].dtype == torch.float16 and tg["d"].shape == (12, 2)
    loss = student_loss("dbr", s, mb, tg, 20.0)
    # Eq. 8: d = CE(logits, y); Eq. 10: hinge at r = 0.4 plus alpha = 1 times |d - d^T|
    logp = F.log_softmax(s.double(), 1)
    d_org = -logp.gather(1, mb.y_org[:, None]).squeeze(1)
    d_aug = -logp.gather(1, mb.y_aug[:, None]).squeeze(1)
    dt = tg["d"].double()
    ref = ((d_org - 0.4).clamp_min(0) + (d_aug - 0.4).clamp_min(0)
           + (d_org - dt[:, 0]).abs() + (d_aug - dt[:, 1]).abs()).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    ref_op = nrrdd_ext.reference.dbr_loss(s, mb.y_org, mb.y_aug, dt[:, 0].float(), dt[:, 1].float(), 0.4, 1.0)
    assert loss.item() == pytest.approx(ref_op.item(), rel=1e-5)
    # another margin (nrrdd run --r) reaches the hinge
    loss_r = student_loss("dbr", s, mb, tg, 20.0, dbr_r=1.5)
    ref_r = ((d_org - 1.5).clamp_min(0) + (d_aug - 1.5).clamp_min(0)
             + (d_org - dt[:, 0]).abs() + (d_aug - dt[:, 1]).abs()).mean()
    assert loss_r.item() == pytest.approx(ref_r.item(), rel=1e-5) and abs(ref_r.item() - ref.item()) > 1e-3
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_soft_loss_is_kl_to_the_softened_teacher():
    mb, t, s = _batch()
    T = 20.0
    tg = L.teacher_targets("soft", t, mb.y_org, mb.y_aug, T)
    loss = student_loss("soft", s, mb, tg, T)
    q = torch.softmax(tg["logits"].double() / T, 1)
    ref = (q * (q.log() - F.log_softmax(s.double() / T, 1))).sum(1).mean()  # batchmean, no T^2
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-7)


def test_compact_loss_spreads_the_rest_evenly():
    mb, t, s = _batch(classes=7)
    T = 4.0
    tg = L.teacher_targets("compact", t, mb.y_org, mb.y_aug, T)
    p = torch.softmax(t / T, 1)
    top = p.topk(2, 1)
    assert torch.equal(tg["cls"].long(), top.indices) and tg["cls"].dtype == torch.int16
    q = torch.full((12, 7), 0.0, dtype=torch.float64)
    for i in range(12):
        kept = tg["prob"][i].double()
        q[i] = (1 - kept.sum()) / 5
        q[i, top.indices[i]] = kept
    assert torch.allclose(q.sum(1), torch.ones(12, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(L.compact_distribution(tg["prob"], tg["cls"], 7).double(), q, atol=1e-6)
    loss = student_loss("compact", s, mb, tg, T)
    ref = (q * (q.log() - F.log_softmax(s.double() / T, 1))).sum(1).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4)


def test_onehot_loss_weights_both_labels_by_lambda():
    mb, t, s = _batch()
    assert 0 <= mb.lam <= 1
    loss = student_loss("onehot", s, mb, L.teacher_targets("onehot", t, mb.y_org, mb.y_aug, 1.0), 20.0)
    ref = mb.lam * F.cross_entropy(s, mb.y_org) + (1 - mb.lam) * F.cross_entropy(s, mb.y_aug)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def _evaluate(dist, labels, *extra):
    return main(["evaluate", "--distilled", str(dist), "--labels", labels, "--student", "convnet3",
                 "--device", "cpu", "--quiet", *extra])


def test_eval_json_and_online_equals_stored(setup):
    dist, seed = setup / "dist", fresh_seed()
    assert main(["relabel", "--distilled", str(dist), "--mode", "dbr", "--epochs", "2", "--seed", str(seed),
                 "--batch-size", "5", "--device", "cpu", "--quiet"]) == 0
    assert _evaluate(dist, "dbr", "--seeds", "2") == 0
    e = json.loads((dist / "eval_dbr_convnet3.json").read_text())
    m = json.loads((dist / "labels_dbr" / "manifest.json").read_text())
    assert len(e["top1"]) == 2 and e["student_seeds"] == [0, 1]
    assert all(0 <= a <= 100 for a in e["top1"])
    assert e["top1_mean"] == pytest.approx(statistics.fmean(e["top1"]))
    assert e["top1_std"] == pytest.approx(statistics.pstdev(e["top1"]))
    assert e["label_bytes"] == m["bytes_stored"] == 12 * 2 * 4
    assert e["labels"] == "dbr" and e["student"] == "convnet3" and e["epochs"] == 2
    assert e["replay_seed"] == seed and e["top1_at"] == "last epoch"
    assert e["dbr_r"] == 0.4 and e["dbr_alpha"] == 1.0 and e["seconds"] > 0
    # 15 test images (5 per class): top-1 is a multiple of 100/15
    assert all(abs(a * 15 / 100 - round(a * 15 / 100)) < 1e-9 for a in e["top1"])
    # online: the teacher runs during training on the same x_mix -> the very same students
    assert _evaluate(dist, "dbr", "--seeds", "2", "--online", "--epochs", "2", "--seed", str(seed),
                     "--batch-size", "5") == 0
    # without a label folder the protocol is the command line's: what differs is in the name
    o = json.loads((dist / f"eval_dbr-online-e2-s{seed}-b5_convnet3.json").read_text())
    assert o["online"] and o["label_bytes"] == 0
    assert o["top1"] == e["top1"] and o["final_train_loss"] == e["final_train_loss"]
    # both name the teacher behind their targets by its weights' fingerprint
    assert e["teacher_sha256"] == o["teacher_sha256"] == m["teacher"]["sha256"]
    assert m["teacher"]["sha256"] == load_teacher(setup / "teacher.pt")[1]["sha256"]


def test_eval_at_other_student_settings_keeps_the_default_evaluation(setup, capsys):
    """An r sweep over one set (``nrrdd evaluate --dbr-r``) writes a file per margin."""
    dist, seed = setup / "dist", fresh_seed()
    assert main(["relabel", "--distilled", str(dist), "--mode", "dbr", "--epochs", "2", "--seed", str(seed),
                 "--batch-size", "5", "--device", "cpu", "--quiet"]) == 0
    assert _evaluate(dist, "dbr", "--seeds", "1") == 0
    default = (dist / "eval_dbr_convnet3.json").read_bytes()
    assert _evaluate(dist, "dbr", "--seeds", "1", "--dbr-r", "0.2", "--lr", "0.002") == 0
    assert (dist / "eval_dbr_convnet3.json").read_bytes() == default  # untouched
    v = json.loads((dist / "eval_dbr-r0.2-lr0.002_convnet3.json").read_text())
    assert v["dbr_r"] == 0.2 and v["variant"] == "r0.2-lr0.002" and v["optimizer"]["lr"] == 0.002
    assert json.loads(default)["variant"] == ""
    assert main(["evaluate", "--distilled", str(dist), "--labels", "soft", "--student", "convnet3",
                 "--device", "cpu", "--quiet", "--online", "--epochs", "1", "--batch-size", "5",
                 "--temperature", "3"]) == 0
    assert (dist / "eval_soft-online-e1-b5-t3_convnet3.json").is_file()
    capsys.readouterr()
    assert main(["report", str(dist)]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and "convnet3" in r]
    labels = sorted(r.split(" | ")[3] for r in rows)
    assert labels == ["dbr", "dbr (r0.2-lr0.002)", "soft+online (e1-b5-t3)"]


def test_eval_variant_names_only_what_differs():
    from nrrdd.student import eval_name, eval_variant

    assert eval_variant("dbr") == "" and eval_variant("dbr", dbr_r=0.4, lr=1e-3, weight_decay=0.01) == ""
    assert eval_variant("dbr", dbr_r=0.7) == "r0.7"
    assert eval_variant("soft", dbr_r=0.7) == ""  # the margin only reaches DBR students
    assert eval_variant("soft", temperature=20.0, default_temperature=20.0) == ""
    assert eval_variant("soft", temperature=4.0, default_temperature=20.0, weight_decay=0.05) == "t4-wd0.05"
    assert eval_variant("compact", temperature=4.0, default_temperature=20.0) == ""  # fixed by its labels
    assert eval_variant("dbr", dbr_r=0.7, bf16=True) == "r0.7-bf16"
    assert eval_name("dbr", "convnet3", False, "holdout", "r0.1") == "eval_dbr-r0.1_convnet3-holdout"
    assert eval_name("soft", "resnet18", True) == "eval_soft-online_resnet18"


def test_protocol_variant_names_only_what_differs():
    from nrrdd.student import EPOCHS, protocol_variant

    base = AugmentConfig(batch_size=100, min_scale=0.5)
    assert protocol_variant(base, base, EPOCHS, 0) == []
    other = AugmentConfig(batch_size=50, min_scale=0.25, mix="mixup")
    assert protocol_variant(other, base, 40, 3) == ["e40", "s3", "b50", "ms0.25", "mixup"]
    assert protocol_variant(AugmentConfig(min_scale=0.5, flip=False), base, EPOCHS, 0) == ["flipFalse"]


def test_onehot_without_labels_at_another_protocol_keeps_the_first_evaluation(setup):
    """One-hot students need no label folder, so their epochs, replay seed and augmentation
    come from the command line: an evaluation that changes them gets its own file."""
    dist = setup / "dist"
    assert _evaluate(dist, "onehot", "--seeds", "1", "--epochs", "2") == 0
    first = (dist / "eval_onehot-e2_convnet3.json").read_bytes()
    assert _evaluate(dist, "onehot", "--seeds", "1", "--epochs", "2", "--seed", "3", "--mix", "mixup",
                     "--min-scale", "0.25", "--batch-size", "6") == 0
    assert (dist / "eval_onehot-e2_convnet3.json").read_bytes() == first
    v = json.loads((dist / "eval_onehot-e2-s3-b6-ms0.25-mixup_convnet3.json").read_text())
    assert v["variant"] == "e2-s3-b6-ms0.25-mixup" and v["epochs"] == 2 and v["replay_seed"] == 3
    assert json.loads(first)["variant"] == "e2"


def test_interrupted_student_resumes_to_the_same_result(setup):
    dist = setup / "dist"
    assert main(["relabel", "--distilled", str(dist), "--mode", "soft", "--epochs", "3",
                 "--batch-size", "5", "--device", "cpu", "--quiet"]) == 0
    ds = load_distilled(dist)
    m = L.LabelStore(dist, "soft").manifest()
    cfg = AugmentConfig.from_dict(m["augment"])
    test = load_split("imagefolder", setup / "data", "test", SIZE)
    args = (ds, "convnet3", "soft", None, cfg, 0, 3, 7, CLASSES, test, ds.config["mean"], ds.config["std"])
    stored = StoredLabels(L.LabelStore(dist, "soft"), m, "cpu")

    def interrupting(mb):
        if mb.epoch == 2:
            raise KeyboardInterrupt
        return stored(mb)

    ckpt = setup / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        train_student(*args[:3], interrupting, *args[4:], checkpoint=ckpt, checkpoint_every_s=0.0,
                      settings={"k": 1}, quiet=True)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    resumed = train_student(*args[:3], stored, *args[4:], checkpoint=ckpt, settings={"k": 1}, quiet=True)
    fresh = train_student(*args[:3], stored, *args[4:], quiet=True)
    assert resumed.final_loss == fresh.final_loss and resumed.top1 == fresh.top1
    with pytest.raises(UsageError, match="other settings \\(k 1 there, 2 now\\)"):  # named, and refused
        train_student(*args[:3], stored, *args[4:], checkpoint=ckpt, settings={"k": 2}, quiet=True)


def test_channels_last_and_bf16_students_train_the_same_network(setup):
    """One epoch of one batch: its loss is the fresh student's on the replayed batch, the same
    in the channels_last layout to float32 rounding and under bf16 autocast to bf16 rounding;
    the channels_last student's conv weights are stored in that layout; the command names a
    bf16 evaluation apart (the fp32 one stays) and records layout and precision."""
    from nrrdd.student import no_labels

    dist = setup / "dist"
    ds = load_distilled(dist)
    test = load_split("imagefolder", setup / "data", "test", SIZE)
    whole = AugmentConfig(batch_size=len(ds), min_scale=0.5)
    args = (ds, "convnet3", "onehot", no_labels, whole, fresh_seed() % 1000, 1, 5, CLASSES, test,
            ds.config["mean"], ds.config["std"])
    plain = train_student(*args, checkpoint=setup / "plain.pt", quiet=True)
    cl = train_student(*args, checkpoint=setup / "cl.pt", quiet=True, channels_last=True)
    bf = train_student(*args, quiet=True, bf16=True)
    assert 0.5 < plain.final_loss < 3  # about ln 3 for a fresh student
    assert cl.final_loss == pytest.approx(plain.final_loss, rel=1e-5)
    assert bf.final_loss != plain.final_loss and bf.final_loss == pytest.approx(plain.final_loss, rel=2e-2)
    w = {f: torch.load(setup / f"{f}.pt", weights_only=True)["model"] for f in ("plain", "cl")}
    convs = [k for k, v in w["plain"].items() if v.dim() == 4]
    assert convs and all(w["cl"][k].is_contiguous(memory_format=torch.channels_last) for k in convs)
    assert not all(w["plain"][k].is_contiguous(memory_format=torch.channels_last) for k in convs)
    # the command
    assert _evaluate(dist, "onehot", "--seeds", "1", "--epochs", "2") == 0
    assert _evaluate(dist, "onehot", "--seeds", "1", "--epochs", "2", "--bf16", "--channels-last") == 0
    fp32 = json.loads((dist / "eval_onehot-e2_convnet3.json").read_text())
    b = json.loads((dist / "eval_onehot-e2-bf16_convnet3.json").read_text())
    assert (fp32["precision"], fp32["channels_last"]) == ("fp32", False)
    assert (b["precision"], b["channels_last"], b["variant"]) == ("bf16", True, "e2-bf16")


def test_bad_input_exits_2(setup, tmp_path, capsys):
    dist, seed = setup / "dist", fresh_seed()
    assert _evaluate(dist, "dbr", "--seeds", "1") == 2  # no labels_dbr yet
    assert main(["relabel", "--distilled", str(dist), "--mode", "dbr", "--epochs", "2", "--seed", str(seed),
                 "--batch-size", "5", "--device", "cpu", "--quiet"]) == 0
    assert _evaluate(dist, "dbr", "--epochs", "3") == 2  # labels made for 2 epochs
    assert _evaluate(dist, "dbr", "--seed", str(seed + 1)) == 2  # labels made with another seed
    assert _evaluate(dist, "onehot", "--online") == 2
    assert _evaluate(dist, "dbr", "--dataset", "cifar10") == 2  # not the set's dataset
    assert main(["evaluate", "--distilled", str(dist), "--labels", "dbr", "--student", "no-such-net",
                 "--device", "cpu"]) == 2
    assert _evaluate(tmp_path / "missing", "dbr") == 2
    # a distilled set with more classes than the real test set
    make_teacher(tmp_path / "t4.pt", CLASSES + 1, 1, SIZE)
    make_distilled(tmp_path / "d4", tmp_path / "t4.pt", setup / "data", 2, CLASSES + 1, 1, SIZE)
    assert _evaluate(tmp_path / "d4", "onehot", "--epochs", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 8 and all(line.startswith("nrrdd evaluate: error: ") for line in err)
    assert not list(dist.glob("eval_*.json"))

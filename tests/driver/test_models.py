"""nrrdd.models: architectures, the CAM interface, teacher checkpoints."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import nrrdd_ext
from nrrdd.errors import UsageError
from nrrdd.models import ConvNet, build_model, cam_interface, check_cam_shapes
from nrrdd.teacher import load_teacher, save_teacher


def _eval_with_stats(model, c, s):
    with torch.no_grad():
        model.train()
        model(torch.randn(4, c, s, s))
    return model.eval()


def _manual_cam(features, weight, labels):
    """Eq. 1 by hand, then min-max normalisation."""
    w = weight[labels]
    if w.dim() == 2:
        raw = (w[:, :, None, None] * features).sum(1)
    else:
        raw = (w * features).sum(1)
    flat = raw.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo + 1e-8)).view_as(raw)


@pytest.mark.parametrize("arch,c,s,head", [
    ("convnet3", 1, 28, "flatten"), ("convnet4", 3, 16, "flatten"),
    ("resnet18", 1, 16, "pooled"), ("mobilenetv2", 3, 16, "pooled"),
    ("efficientnet_b0", 3, 16, "pooled"), ("resnet10t", 3, 32, "pooled"),  # the last via timm
])
def test_cam_interface_matches_logits_and_manual_cam(arch, c, s, head):
    torch.manual_seed(0)
    model = _eval_with_stats(build_model(arch, 5, c, s), c, s).double()
    cam = cam_interface(model)
    x = torch.randn(3, c, s, s, dtype=torch.float64)
    y = torch.tensor([0, 4, 2])
    with torch.no_grad():
        f = cam.forward_features(x)
        logits = cam.forward_head(f)
        assert torch.allclose(logits, model(x), atol=1e-12)  # one forward gives both
        w = cam.classifier_weight()
        assert w.dim() == (4 if head == "flatten" else 2) and w.shape[:2] == (5, f.shape[1])
        # The weight is the head's: logit_y = <w_y, f> (+ bias), pooled or flattened.
        raw = (w[y] * (f if w.dim() == 4 else f.mean((2, 3)))).flatten(1).sum(1)
        bias = logits[torch.arange(3), y] - raw
        lin = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        assert torch.allclose(bias, lin.bias[y], atol=1e-10)
        got = nrrdd_ext.class_activation_map(f, w, y)
        assert torch.allclose(got, _manual_cam(f, w, y), atol=1e-10)


def test_convnet_layout():
    m = build_model("convnet3", 10, 1, 28)
    assert isinstance(m, ConvNet)
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert [cv.out_channels for cv in convs] == [128] * 3 and convs[0].padding == (3, 3)
    assert sum(isinstance(x, nn.BatchNorm2d) for x in m.modules()) == 3
    assert sum(isinstance(x, nn.AvgPool2d) for x in m.modules()) == 3
    assert m.feature_shape == (128, 4, 4) and m.classifier.in_features == 2048
    assert build_model("convnet6", 10, 3, 64).feature_shape == (128, 1, 1)
    with pytest.raises(UsageError, match="larger images"):
        build_model("convnet6", 10, 3, 32)


def test_resnet_stems():
    small = build_model("resnet18", 10, 1, 32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert small.conv1.in_channels == 1 and isinstance(small.maxpool, nn.Identity)
    big = build_model("resnet50", 10, 3, 224)
    assert big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, nn.MaxPool2d)
    check_cam_shapes(small, 1, 32)


def test_unknown_arch_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown arch"):
        build_model("no_such_net_42", 10, 3, 32)


def test_teacher_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    model = _eval_with_stats(build_model("convnet3", 3, 1, 16), 1, 16)
    meta = {"format": "nrrdd-teacher-v1", "arch": "convnet3", "num_classes": 3, "in_channels": 1,
            "image_size": 16, "dataset": "imagefolder", "mean": [0.5], "std": [0.25],
            "classes": ["a", "b", "c"], "test_accuracy": 0.75}
    save_teacher(model, meta, tmp_path / "t.pt")
    loaded, got = load_teacher(tmp_path / "t.pt")
    assert not loaded.training and got["test_accuracy"] == 0.75 and got["classes"] == ["a", "b", "c"]
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(UsageError, match="num_classes"):
        load_teacher(tmp_path / "t.pt", num_classes=4)


def test_plain_state_dict_teacher(tmp_path):
    torch.manual_seed(2)
    model = _eval_with_stats(build_model("resnet18", 4, 3, 16), 3, 16)
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "sd.pt")
    with pytest.raises(UsageError, match="plain state dict"):
        load_teacher(tmp_path / "sd.pt")
    loaded, meta = load_teacher(tmp_path / "sd.pt", arch="resnet18", num_classes=4, in_channels=3,
                                image_size=16)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x))
    with pytest.raises(UsageError, match="does not fit"):
        load_teacher(tmp_path / "sd.pt", arch="resnet18", num_classes=7, in_channels=3, image_size=16)
    with pytest.raises(UsageError, match="does not exist"):
        load_teacher(tmp_path / "missing.pt")


def test_train_teacher_cli(idx_dir, tmp_path, capsys):
    from nrrdd.cli import main

    out = tmp_path / "t.pt"
    argv = ["train-teacher", "--dataset", "fashion-mnist", "--data-dir", str(idx_dir), "--arch", "convnet3",
            "--epochs", "1", "--batch-size", "20", "--out", str(out), "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    assert "test accuracy" in capsys.readouterr().out
    model, meta = load_teacher(out)
    assert (meta["arch"], meta["num_classes"], meta["in_channels"], meta["image_size"]) == ("convnet3", 10, 1, 12)
    assert meta["dataset"] == "fashion-mnist" and meta["classes"][9] == "Ankle boot" and meta["epochs"] == 1
    assert 0.0 <= meta["test_accuracy"] <= 1.0 and meta["mean"] == [0.286] and meta["seed"] == 0
    before = out.read_bytes()
    assert main(argv) == 2  # refuses to overwrite without --force
    assert "--force" in capsys.readouterr().err and out.read_bytes() == before
    assert main(argv[:-1] + ["--arch", "nonsense_net_3", "--force", "--quiet"]) == 2
    assert out.read_bytes() == before


def test_teacher_augmentation_modes():
    from nrrdd.teacher import augment_batch

    x = torch.randn(16, 1, 8, 8)
    flips = augment_batch(x, torch.Generator().manual_seed(0), "flip")
    assert all(torch.equal(flips[i], x[i]) or torch.equal(flips[i], x[i].flip(2)) for i in range(16))
    assert torch.equal(augment_batch(x, torch.Generator(), "none"), x)
    crops = augment_batch(x, torch.Generator().manual_seed(0), "standard")
    # a crop of the zero-padded image: every output row/column is a shifted copy or zeros
    assert crops.shape == x.shape and not torch.equal(crops, x)
    assert torch.equal(crops, augment_batch(x, torch.Generator().manual_seed(0), "standard"))


def _tiny_split(idx_dir, split):
    from nrrdd.data import load_split

    return load_split("fashion-mnist", str(idx_dir), split, None)


def test_interrupted_teacher_training_resumes_to_identical_weights(idx_dir, tmp_path):
    from nrrdd.teacher import train_teacher

    train, test = _tiny_split(idx_dir, "train"), _tiny_split(idx_dir, "test")
    kw = dict(epochs=3, batch_size=20, quiet=True, augment="standard", seed=4)
    whole, meta = train_teacher("convnet3", train, test, checkpoint=tmp_path / "a.partial", **kw)

    class Stop(Exception):
        pass

    def stop_after_two(epoch):
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        train_teacher("convnet3", train, test, checkpoint=tmp_path / "b.partial", on_epoch_end=stop_after_two, **kw)
    assert torch.load(tmp_path / "b.partial", weights_only=True)["epoch"] == 2
    resumed, meta_r = train_teacher("convnet3", train, test, checkpoint=tmp_path / "b.partial", **kw)
    for (k, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    assert meta_r["test_accuracy"] == meta["test_accuracy"]
    with pytest.raises(UsageError, match="other settings.*lr 0.05 there, 0.01 now"):
        train_teacher("convnet3", train, test, checkpoint=tmp_path / "b.partial", lr=0.01, **kw)


def test_bf16_channels_last_teacher_saves_a_plain_fp32_checkpoint(idx_dir, tmp_path):
    from nrrdd.teacher import train_teacher

    train, test = _tiny_split(idx_dir, "train"), _tiny_split(idx_dir, "test")
    model, meta = train_teacher("resnet18", train, test, epochs=1, batch_size=20, quiet=True,
                                bf16=True, channels_last=True)
    assert meta["precision"] == "bf16" and meta["channels_last"]
    save_teacher(model, meta, tmp_path / "t.pt")
    loaded, _ = load_teacher(tmp_path / "t.pt")
    state = torch.load(tmp_path / "t.pt", weights_only=True)["state_dict"]
    assert all(v.is_contiguous() and (not v.is_floating_point() or v.dtype == torch.float32) for v in state.values())
    x = torch.randn(6, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # One step per epoch (batch 40 of 40 images): the logged loss is the first forward's.
    # Under bf16 it is the fp32 loss within bf16 roundoff, and not equal to it (autocast
    # is on); channels_last alone changes the memory layout, not the numbers.
    import re

    def first_loss_and_weights(**kw):
        msgs = []
        net, _ = train_teacher("resnet18", train, test, epochs=1, batch_size=40, quiet=False, seed=3,
                               log=msgs.append, **kw)
        return float(re.search(r"train loss ([0-9.]+)", msgs[-1]).group(1)), net.state_dict()

    loss32, w32 = first_loss_and_weights()
    loss16, _ = first_loss_and_weights(bf16=True, channels_last=True)
    assert loss16 != loss32 and abs(loss16 - loss32) < 0.01 * loss32
    _, wcl = first_loss_and_weights(channels_last=True)
    for k, v in w32.items():
        torch.testing.assert_close(wcl[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_train_teacher_cli_keeps_an_unfinished_training(idx_dir, tmp_path, capsys):
    from nrrdd.cli import main
    from nrrdd.teacher import partial_path

    out = tmp_path / "t.pt"
    partial = partial_path(out)
    partial.write_bytes(b"an hour of training")
    argv = ["train-teacher", "--dataset", "fashion-mnist", "--data-dir", str(idx_dir), "--arch", "convnet3",
            "--epochs", "1", "--batch-size", "20", "--out", str(out), "--device", "cpu", "--quiet"]
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err and partial.read_bytes() == b"an hour of training"
    assert not out.exists()
    assert main(argv + ["--force"]) == 0
    assert out.is_file() and not partial.exists()

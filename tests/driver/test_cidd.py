"""nrrdd.cidd: crop geometry, CAM scoring, the confidence selection, stitching."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from nrrdd_tiny import small_convnet

from nrrdd_ext import reference
from nrrdd.cidd import (box_means, cidd_class, class_candidates, crop_resize, discover,
                        random_resized_boxes, stitch)
from nrrdd.models import cam_interface


def test_random_resized_boxes_follow_torchvision_ranges():
    g = torch.Generator().manual_seed(0)
    b = random_resized_boxes(4000, 24, 32, g)
    x0, y0, w, h = b.unbind(1)
    assert b.dtype == torch.int64
    assert bool(((x0 >= 0) & (y0 >= 0) & (x0 + w <= 32) & (y0 + h <= 24) & (w > 0) & (h > 0)).all())
    area = (w * h).double() / (24 * 32)
    fallback = (w == 32) & (h == 24)
    assert bool((area[~fallback] >= 0.08 * 0.85).all())  # rounding of w, h aside
    ratio = (w.double() / h.double())[~fallback]
    assert float(ratio.min()) > 0.6 and float(ratio.max()) < 1.6
    assert float(area.mean()) > 0.3  # roughly uniform scale in (0.08, 1)
    again = random_resized_boxes(4000, 24, 32, torch.Generator().manual_seed(0))
    assert torch.equal(b, again)


def test_random_resized_boxes_respect_a_narrow_scale():
    b = random_resized_boxes(4000, 24, 32, torch.Generator().manual_seed(1), scale=(0.5, 0.6))
    area = (b[:, 2] * b[:, 3]).double() / (24 * 32)
    # w and h are rounded to whole pixels: at most half a pixel each way of 24-32 px sides
    assert float(area.min()) > 0.5 * (1 - 1 / 24) ** 2 and float(area.max()) < 0.6 * (1 + 1 / 24) ** 2
    assert abs(float(area.mean()) - 0.55) < 0.01


def test_box_means_equal_brute_force():
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(3, 10, 12, generator=g, dtype=torch.float64)
    boxes = random_resized_boxes(3 * 7, 10, 12, g).view(3, 7, 4)
    got = box_means(maps, boxes)
    for i in range(3):
        for j in range(7):
            x0, y0, w, h = boxes[i, j].tolist()
            assert abs(float(got[i, j]) - float(maps[i, y0:y0 + h, x0:x0 + w].mean())) < 1e-12


def test_crop_resize_identity_and_same_size_crop():
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    full = torch.tensor([[0, 0, 11, 9], [0, 0, 11, 9]])
    assert torch.allclose(crop_resize(x, full, (9, 11)), x, atol=1e-12)
    box = torch.tensor([[2, 1, 5, 4], [6, 5, 5, 4]])  # (x0, y0, w, h) resized to (h, w): a slice
    out = crop_resize(x, box, (4, 5))
    assert torch.allclose(out[0], x[0, :, 1:5, 2:7], atol=1e-12)
    assert torch.allclose(out[1], x[1, :, 5:9, 6:11], atol=1e-12)


def test_stitch_places_patches_row_major():
    patches = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 2, 6, 6).contiguous()
    out = stitch(patches, 2)
    assert out.shape == (2, 2, 6, 6)
    assert out[0, 0, :3, :3].unique().tolist() == [0.0] and out[0, 0, :3, 3:].unique().tolist() == [1.0]
    assert out[0, 0, 3:, :3].unique().tolist() == [2.0] and out[1, 0, 3:, 3:].unique().tolist() == [7.0]
    odd = stitch(torch.randn(9, 1, 7, 7), 3)  # 7 px in 3 cells: 2, 3, 2
    assert odd.shape == (1, 1, 7, 7)
    with pytest.raises(ValueError):
        stitch(torch.randn(5, 1, 4, 4), 2)


def _brute_force(model, images, label, boxes, num_crop, top_t, need, select):
    """Alg. 1 lines 2-11 one image and one patch at a time, from the reference CAM.

    Also returns the smallest gap at a choice's boundary (between the top_t-th and the
    next crop's CAM mass, and between the need-th and the next patch's confidence): where
    it is at rounding level the choice is a tie, which either order may break."""
    cam = cam_interface(model)
    N, C, H, W = images.shape
    pool = []  # (confidence, image index, box)
    gaps = []
    with torch.no_grad():
        for i in range(N):
            f = cam.forward_features(images[i:i + 1])
            y = torch.tensor([label])
            c = reference.class_activation_map(f, cam.classifier_weight(), y)
            up = F.interpolate(c[:, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
            scored = []
            for j in range(num_crop):
                x0, y0, w, h = boxes[i, j].tolist()
                scored.append((float(up[y0:y0 + h, x0:x0 + w].mean()), j))
            ranked_crops = sorted(scored, key=lambda t: -t[0])
            gaps.append(ranked_crops[top_t - 1][0] - ranked_crops[top_t][0])
            best = ranked_crops[:top_t]
            for _, j in best:
                patch = crop_resize(images[i:i + 1], boxes[i, j][None], (H, W))
                p = torch.softmax(cam.forward_head(cam.forward_features(patch)), 1)[0, label]
                pool.append((float(p), i, tuple(boxes[i, j].tolist())))
    ranked = sorted(pool, key=lambda t: t[0], reverse=(select == "highest"))
    gaps.append(abs(ranked[need - 1][0] - ranked[need][0]))
    return pool, ranked[:need], min(gaps)


@pytest.mark.parametrize("select,crop_scale", [("lowest", (0.08, 1.0)), ("highest", (0.08, 1.0)),
                                               ("lowest", (0.5, 1.0))])
def test_selection_equals_brute_force(select, crop_scale):
    model = small_convnet(num_classes=4, image_size=12, dtype=torch.float64)
    sources = torch.arange(100, 106)
    num_crop, top_t, ipc, factor = 4, 2, 2, 2
    images = torch.randn(6, 1, 12, 12, dtype=torch.float64)
    # The crops are redrawn while a choice is a tie. The CAM here is 2 x 2, upsampled
    # bilinearly, and the mean of a bilinear field over a box is its value at the box's
    # centre: two boxes with one centre hold exactly the same CAM mass, and which of them
    # wins is float rounding (it differs between CPUs).
    for crop_seed in range(7, 57):
        boxes = random_resized_boxes(6 * num_crop, 12, 12, torch.Generator().manual_seed(crop_seed),
                                     scale=crop_scale).view(6, num_crop, 4)
        pool, chosen, gap = _brute_force(model, images, 1, boxes, num_crop, top_t, ipc * factor ** 2, select)
        if gap > 1e-9:
            break
    assert gap > 1e-9, "every draw of crops holds a tie"
    res = discover(model, images, sources, 1, ipc, torch.Generator().manual_seed(crop_seed), factor=factor,
                   num_crop=num_crop, top_t=top_t, select=select, batch_size=5, crop_scale=crop_scale)
    assert res.pool_confidence.numel() == len(pool) == 12
    assert sorted(res.pool_confidence.tolist()) == pytest.approx(sorted(p for p, _, _ in pool), abs=1e-10)
    assert res.patch_confidence.tolist() == pytest.approx([p for p, _, _ in chosen], abs=1e-10)
    assert res.patch_source.tolist() == [100 + i for _, i, _ in chosen]
    assert [tuple(b) for b in res.patch_box.tolist()] == [b for _, _, b in chosen]
    # the chosen patches are exactly the lowest (highest) of the pool
    conf = res.pool_confidence
    kept = res.patch_confidence
    rest = torch.tensor(sorted(conf.tolist()))
    want = rest[:8] if select == "lowest" else rest.flip(0)[:8]
    assert torch.allclose(kept, want.to(kept), atol=1e-12)
    # and they are stitched in selection order
    patches = torch.cat([crop_resize(images[i:i + 1], torch.tensor([b]), (12, 12)) for _, i, b in chosen])
    assert torch.allclose(res.images, stitch(patches, factor), atol=1e-12)


def test_random_select_and_pool_size_check():
    model = small_convnet(num_classes=3, image_size=12)
    images = torch.randn(4, 1, 12, 12)
    res = discover(model, images, torch.arange(4), 0, 1, torch.Generator().manual_seed(0),
                   factor=2, num_crop=3, top_t=1, select="random")
    assert res.images.shape == (1, 1, 12, 12) and res.patch_confidence.numel() == 4
    with pytest.raises(ValueError, match="patch pool"):
        discover(model, images, torch.arange(4), 0, 2, torch.Generator(), factor=2, num_crop=3, top_t=1)


class _TinySet:
    """The part of ImageSet that cidd_class reads."""

    def __init__(self, n_per_class=5, classes=3, size=12):
        g = torch.Generator().manual_seed(3)
        self.labels = torch.arange(classes).repeat_interleave(n_per_class)
        self.pixels = torch.rand(self.labels.numel(), 1, size, size, generator=g)

    def get(self, idx):
        return self.pixels[idx]

    def normalize(self, x):
        return (x - 0.5) / 0.25


def test_class_results_do_not_depend_on_other_classes():
    model = small_convnet(num_classes=3, image_size=12)
    ds = _TinySet()
    kw = dict(mipc=3, factor=1, num_crop=2, top_t=1, batch_size=4)
    alone = cidd_class(model, ds, 2, 2, 11, "cpu", **kw)
    for c in (0, 1):
        cidd_class(model, ds, c, 2, 11, "cpu", **kw)
    after = cidd_class(model, ds, 2, 2, 11, "cpu", **kw)
    assert torch.equal(alone.images, after.images)
    assert set(alone.patch_source.tolist()) <= set(range(10, 15))
    other_seed = cidd_class(model, ds, 2, 2, 12, "cpu", **kw)
    assert not torch.equal(alone.images, other_seed.images)


def test_class_candidates():
    labels = torch.tensor([0, 1, 0, 1, 0, 0])
    assert class_candidates(labels, 0, None, torch.Generator()).tolist() == [0, 2, 4, 5]
    assert class_candidates(labels, 1, 10, torch.Generator()).tolist() == [1, 3]
    some = class_candidates(labels, 0, 2, torch.Generator().manual_seed(0))
    assert some.numel() == 2 and set(some.tolist()) <= {0, 2, 4, 5}

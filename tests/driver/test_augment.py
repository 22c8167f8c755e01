"""Replayable augmentation (nrrdd.augment): x_mix is a pure function of (seed, epoch, batch)."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from nrrdd.augment import (AugmentConfig, batch_indices, crop_flip, draw_batch, epoch_order, generator,
                           mix, num_batches, replay_batch, replay_epoch, sample_beta)
from nrrdd_toy import fresh_seed


def _data(n=23, c=3, size=12, classes=5):
    g = torch.Generator().manual_seed(fresh_seed())
    return torch.randn(n, c, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("mix_type", ["cutmix", "mixup", "none"])
def test_replay_is_pure_and_varies_with_epoch_and_batch(mix_type):
    images, labels = _data()
    cfg = AugmentConfig(batch_size=7, min_scale=0.3, mix=mix_type)
    seed = fresh_seed()
    nb = num_batches(len(images), cfg.batch_size)
    assert nb == math.ceil(23 / 7)
    rng = random.Random(seed)
    for _ in range(4):
        e, b = rng.randrange(50), rng.randrange(nb)
        first = replay_batch(images, labels, cfg, seed, e, b)
        # a fresh copy of the inputs, rebuilt later: identical tensors
        again = replay_batch(images.clone(), labels.clone(), cfg, seed, e, b)
        assert torch.equal(first.x, again.x)
        assert torch.equal(first.indices, again.indices)
        assert torch.equal(first.y_aug, again.y_aug) and first.lam == again.lam
        assert torch.equal(first.y_aug, first.y_org[first.perm])
        assert torch.equal(first.y_org, labels[first.indices])
        # another batch of the same epoch, the same batch of another epoch, another seed: different
        other_b = replay_batch(images, labels, cfg, seed, e, (b + 1) % nb)
        other_e = replay_batch(images, labels, cfg, seed, e + 1, b)
        other_s = replay_batch(images, labels, cfg, seed + 1, e, b)
        for o in (other_b, other_e, other_s):
            assert not (o.x.shape == first.x.shape and torch.equal(o.x, first.x))


def test_epoch_order_is_a_permutation_split_into_batches():
    n, bs, seed = 23, 7, fresh_seed()
    order = epoch_order(n, seed, 3)
    assert sorted(order.tolist()) == list(range(n))
    assert not torch.equal(order, epoch_order(n, seed, 4))
    parts = [batch_indices(n, bs, seed, 3, b) for b in range(num_batches(n, bs))]
    assert [len(p) for p in parts] == [7, 7, 7, 2]
    assert torch.equal(torch.cat(parts), order)
    images, labels = _data(n)
    seen = torch.cat([mb.indices for mb in replay_epoch(images, labels, AugmentConfig(batch_size=bs), seed, 3)])
    assert torch.equal(seen, order)
    with pytest.raises(IndexError):
        batch_indices(n, bs, seed, 3, 4)


def test_full_box_is_identity_and_flip_mirrors():
    images, labels = _data()
    cfg = AugmentConfig(batch_size=8, min_scale=1.0, min_ratio=1.0, max_ratio=1.0, mix="none")
    mb = replay_batch(images, labels, cfg, fresh_seed(), 5, 1)
    draws = draw_batch(len(mb.indices), 12, 12, cfg, 0, 0, 0)
    assert torch.allclose(draws.crop, torch.tensor([[0.0, 0.0, 12.0, 12.0]], dtype=torch.float64).expand(8, 4))
    src = images[mb.indices]
    flipped = src.flip(3)
    for i in range(len(mb.indices)):
        near_id = torch.allclose(mb.x[i], src[i], atol=1e-5)
        near_flip = torch.allclose(mb.x[i], flipped[i], atol=1e-5)
        assert near_id or near_flip
    # and the flip decision is the drawn one
    cfg_noflip = AugmentConfig(batch_size=8, min_scale=1.0, min_ratio=1.0, max_ratio=1.0, flip=False, mix="none")
    mb2 = replay_batch(images, labels, cfg_noflip, 0, 0, 0)
    assert torch.allclose(mb2.x, images[mb2.indices], atol=1e-5)


def _bilinear_reference(img: torch.Tensor, x0: float, y0: float, w: float, h: float) -> torch.Tensor:
    """Output pixel (i, j) samples the image at the box point ((j + .5) w/W, (i + .5) h/H),
    bilinearly, with coordinates clamped to the image (torchvision's resize convention)."""
    C, H, W = img.shape
    out = torch.empty(C, H, W, dtype=torch.float64)
    img = img.double()
    for i in range(H):
        for j in range(W):
            sx = min(max(x0 + (j + 0.5) * w / W - 0.5, 0.0), W - 1.0)
            sy = min(max(y0 + (i + 0.5) * h / H - 0.5, 0.0), H - 1.0)
            xa, ya = int(math.floor(sx)), int(math.floor(sy))
            xb, yb = min(xa + 1, W - 1), min(ya + 1, H - 1)
            fx, fy = sx - xa, sy - ya
            out[:, i, j] = ((1 - fy) * ((1 - fx) * img[:, ya, xa] + fx * img[:, ya, xb])
                            + fy * ((1 - fx) * img[:, yb, xa] + fx * img[:, yb, xb]))
    return out


def test_crop_is_bilinear_sampling_of_the_box():
    g = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(3, 2, 12, 12, generator=g)
    crop = torch.tensor([[0.0, 0.0, 6.0, 6.0], [5.5, 2.25, 6.5, 9.0], [1.0, 3.0, 11.0, 7.5]],
                        dtype=torch.float64)
    flip = torch.tensor([False, True, False])
    out = crop_flip(x, crop, flip)
    for k in range(3):
        ref = _bilinear_reference(x[k], *crop[k].tolist())
        if flip[k]:
            ref = ref.flip(2)
        assert torch.allclose(out[k].double(), ref, atol=1e-5)
    # an integer box halving the image is plain 2x bilinear upsampling away from the box's far edge
    up = F.interpolate(x[:1, :, :6, :6], size=(12, 12), mode="bilinear", align_corners=False)
    assert torch.allclose(out[:1, :, :11, :11], up[:, :, :11, :11], atol=1e-5)


def test_cutmix_pastes_the_partner_box_and_reports_the_area_lambda():
    images, labels = _data(n=16, size=20)
    cfg = AugmentConfig(batch_size=16, mix="cutmix")
    seed = fresh_seed()
    for e in range(6):
        draws = draw_batch(16, 20, 20, cfg, seed, e, 0)
        x = crop_flip(images, draws.crop, draws.flip)
        out = mix(x, draws, cfg)
        x1, y1, x2, y2 = draws.box
        inside = torch.zeros(20, 20, dtype=torch.bool)
        inside[y1:y2, x1:x2] = True
        assert torch.equal(out[:, :, inside], x[draws.perm][:, :, inside])
        assert torch.equal(out[:, :, ~inside], x[:, :, ~inside])
        assert draws.lam == pytest.approx(1 - inside.sum().item() / 400)
        assert sorted(draws.perm.tolist()) == list(range(16))


def test_mixup_blend():
    images, labels = _data(n=10)
    cfg = AugmentConfig(batch_size=10, mix="mixup", mix_alpha=0.8)
    draws = draw_batch(10, 12, 12, cfg, fresh_seed(), 2, 0)
    x = crop_flip(images, draws.crop, draws.flip)
    assert 0 < draws.lam < 1
    assert torch.allclose(mix(x, draws, cfg), draws.lam * x + (1 - draws.lam) * x[draws.perm])


@pytest.mark.parametrize("alpha", [0.8, 1.0, 2.0])
def test_beta_sampler_moments(alpha):
    g = generator(fresh_seed())
    s = torch.tensor([sample_beta(alpha, g) for _ in range(4000)])
    assert ((s > 0) & (s < 1)).all()
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); 4000 draws -> sd of the mean ~0.005
    assert s.mean().item() == pytest.approx(0.5, abs=0.025)
    assert s.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.12)


def test_draws_do_not_depend_on_image_dtype():
    images, labels = _data()
    cfg = AugmentConfig(batch_size=9)
    seed = fresh_seed()
    a = replay_batch(images, labels, cfg, seed, 1, 1)
    b = replay_batch(images.double(), labels, cfg, seed, 1, 1)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.perm, b.perm) and a.lam == b.lam
    assert torch.allclose(a.x.double(), b.x, atol=1e-5)


def test_config_round_trip_and_validation():
    cfg = AugmentConfig(batch_size=50, min_scale=0.25, mix="mixup", mix_alpha=0.8)
    assert AugmentConfig.from_dict(cfg.to_dict()) == cfg
    for bad in ({"batch_size": 0}, {"min_scale": 0.0}, {"min_scale": 0.9, "max_scale": 0.5},
                {"mix": "blend"}, {"mix_alpha": 0.0}):
        with pytest.raises(ValueError):
            AugmentConfig(**bad)


@pytest.mark.cuda
@pytest.mark.parametrize("mix_type", ["cutmix", "mixup"])
def test_replay_on_cuda_matches_cpu(mix_type):
    """Images on the GPU replay the same x_mix as on the CPU (the draws stay on the CPU;
    relabelling and students on CUDA depend on it)."""
    images, labels = _data(n=19)
    cfg = AugmentConfig(batch_size=8, min_scale=0.3, mix=mix_type)
    seed = fresh_seed()
    for e, b in ((0, 0), (3, 2), (7, 1)):
        cpu = replay_batch(images, labels, cfg, seed, e, b)
        gpu = replay_batch(images.cuda(), labels.cuda(), cfg, seed, e, b)
        assert gpu.x.is_cuda and gpu.y_org.is_cuda
        assert torch.allclose(gpu.x.cpu(), cpu.x, atol=1e-5)
        assert torch.equal(gpu.y_org.cpu(), cpu.y_org) and torch.equal(gpu.y_aug.cpu(), cpu.y_aug)
        assert torch.equal(gpu.indices, cpu.indices) and gpu.lam == cpu.lam

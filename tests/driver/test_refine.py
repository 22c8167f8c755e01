"""nrrdd.refine: CutMix pairing, the two-pass backward, the masked step, determinism."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from nrrdd_tiny import small_convnet

import nrrdd_ext
from nrrdd_ext import reference
from nrrdd.refine import RefineConfig, Refiner, cutmix, draw_cutmix

F64 = torch.float64


def test_draw_cutmix_perms_and_boxes():
    perms, boxes = draw_cutmix(200, 6, 12, 10, torch.Generator().manual_seed(0))
    assert perms.shape == (200, 6) and boxes.shape == (200, 4)
    assert all(sorted(p.tolist()) == list(range(6)) for p in perms)
    y0, y1, x0, x1 = boxes.unbind(1)
    assert bool(((0 <= y0) & (y0 <= y1) & (y1 <= 12) & (0 <= x0) & (x0 <= x1) & (x1 <= 10)).all())
    frac = ((y1 - y0) * (x1 - x0)).double() / 120
    assert 0.15 < float(frac.mean()) < 0.5  # E[1 - lambda] = 0.5 before clipping
    again = draw_cutmix(200, 6, 12, 10, torch.Generator().manual_seed(0))
    assert torch.equal(perms, again[0]) and torch.equal(boxes, again[1])


def test_cutmix_takes_the_box_from_the_partner():
    B, H, W = 5, 8, 9
    x = torch.arange(B, dtype=F64).view(B, 1, 1, 1).expand(B, 2, H, W).contiguous()
    x = x + torch.rand(B, 2, H, W, dtype=F64) * 0.1  # image i holds values in [i, i + 0.1)
    perm = torch.tensor([3, 0, 4, 1, 2])
    box = torch.tensor([2, 6, 1, 4])  # rows 2..5, cols 1..3
    mixed = cutmix(x, perm, box)
    inside = torch.zeros(H, W, dtype=torch.bool)
    inside[2:6, 1:4] = True
    for i in range(B):
        assert torch.equal(mixed[i][:, inside], x[perm[i]][:, inside])
        assert torch.equal(mixed[i][:, ~inside], x[i][:, ~inside])
    assert int((mixed.floor() != x.floor()).sum()) == 2 * 12 * sum(int(p != i) for i, p in enumerate(perm))


def _refiner(alpha_bn=0.01, label_refine=True, mask="cam", iterations=5, dtype=F64):
    model = small_convnet(num_classes=4, image_size=12, dtype=dtype, seed=1)
    lo, hi = torch.tensor([-1.5]), torch.tensor([2.0])
    cfg = RefineConfig(iterations=iterations, alpha_bn=alpha_bn, label_refine=label_refine, mask=mask,
                       log_every=2)
    return Refiner(model, cfg, lo, hi), model


def _batch(dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 1, 12, 12, generator=g, dtype=dtype), torch.tensor([0, 1, 2, 3, 0, 1])


def _manual_total(model, x, y, perm, box, cfg):
    """L_C of Eq. 11 spelled out with the reference ops: CE + a_bn L_bn + a_lr L_lr."""
    terms = []
    hooks = [m.register_forward_hook(lambda m, i, o: terms.append(reference.bn_stat_loss(i[0], m.running_mean, m.running_var)))
             for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    logits = model(x)
    for h in hooks:
        h.remove()
    bn = cfg.first_bn_multiplier * terms[0] + sum(terms[1:])
    mixed = x.clone()
    y0, y1, x0, x1 = box.tolist()
    mixed[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    lr = reference.label_refine_loss(model(mixed), y, y[perm], r=cfg.r)
    return F.cross_entropy(logits, y) + cfg.alpha_bn * bn + cfg.alpha_lr * lr, (bn, lr)


@pytest.mark.parametrize("alpha_bn", [0.01, 1.0])
def test_two_pass_backward_equals_one_backward_of_the_sum(alpha_bn):
    refiner, model = _refiner(alpha_bn=alpha_bn)
    x0, y = _batch()
    with refiner:
        st = refiner.prepare(x0, y, torch.Generator().manual_seed(3))
        st.step.fill_(2)  # read row 2 of the per-iteration draws
        terms = refiner.gradient(st, two_pass=True)
        g_two = st.x.grad.clone()
        refiner.gradient(st, two_pass=False)
        g_one = st.x.grad.clone()
    x = x0.clone().requires_grad_(True)
    total, (bn, lr) = _manual_total(model, x, y, st.perms[2], st.boxes[2], refiner.config)
    (g_manual,) = torch.autograd.grad(total, x)
    assert g_two.dtype == F64 and float(g_manual.abs().max()) > 1e-4
    assert torch.allclose(g_two, g_one, rtol=1e-10, atol=1e-13)
    assert torch.allclose(g_two, g_manual, rtol=1e-9, atol=1e-12)
    assert float(terms["total"]) == pytest.approx(float(total.detach()), rel=1e-10)
    assert float(terms["bn"]) == pytest.approx(float(bn.detach()), rel=1e-10)
    assert float(terms["lr"]) == pytest.approx(float(lr.detach()), rel=1e-10)


def test_no_label_refine_is_ce_plus_bn_only():
    refiner, model = _refiner(label_refine=False)
    x0, y = _batch()
    with refiner:
        st = refiner.prepare(x0, y, torch.Generator().manual_seed(3))
        terms = refiner.gradient(st)
    assert float(terms["lr"]) == 0.0
    assert float(terms["total"]) == pytest.approx(float(terms["ce"] + 0.01 * terms["bn"]), rel=1e-12)


def test_iteration_is_the_masked_adam_step_of_the_reference():
    refiner, model = _refiner()
    x0, y = _batch()
    cfg = refiner.config
    with refiner:
        st = refiner.prepare(x0, y, torch.Generator().manual_seed(4))
        for it in range(3):
            x_before = st.x.detach().clone()
            m, v, step = st.exp_avg.clone(), st.exp_avg_sq.clone(), st.step.clone().double()
            refiner.iteration(st)
            grad, feats = st.x.grad, st.features
            x_ref = x_before.clone()
            scale = 0.5 * (1 + math.cos(math.pi * it / cfg.iterations))
            assert float(st.lr_scale) == pytest.approx(scale, rel=1e-6)
            reference.masked_refine_step(x_ref, grad, feats, model.classifier_weight(), y, m, v, step,
                                         lr=cfg.lr * scale, betas=cfg.betas, cam_eps=cfg.cam_eps,
                                         clamp_min=torch.tensor([-1.5]), clamp_max=torch.tensor([2.0]))
            assert torch.allclose(st.x.detach(), x_ref, rtol=1e-6, atol=1e-9)
            # pixels the CAM marks critical (mask 0) do not move
            mask = reference.non_critical_mask(feats, model.classifier_weight(), y, (12, 12), cfg.cam_eps)
            frozen = (mask == 0).expand_as(x_ref) & (x_before > -1.5) & (x_before < 2.0)
            assert bool(frozen.any()) and torch.equal(st.x.detach()[frozen], x_before[frozen])
            assert float(st.x.detach().min()) >= -1.5 and float(st.x.detach().max()) <= 2.0
        assert float(st.step) == 3.0


def test_mask_none_moves_every_pixel():
    refiner, _ = _refiner(mask="none", iterations=2)
    x0, y = _batch()
    x0 = x0.clamp(-1.4, 1.9)
    res = refiner.refine(x0, y, torch.Generator().manual_seed(0))
    assert bool((res.images != x0).all())


def test_refine_is_deterministic_and_logs():
    refiner, _ = _refiner(iterations=5, dtype=torch.float32)
    x0, y = _batch(torch.float32)
    a = refiner.refine(x0, y, torch.Generator().manual_seed(5))
    b = refiner.refine(x0, y, torch.Generator().manual_seed(5))
    c = refiner.refine(x0, y, torch.Generator().manual_seed(6))
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert [r["iteration"] for r in a.log] == [2, 4, 5]
    assert set(a.log[0]) >= {"ce", "bn", "lr", "total", "lr_rate"}
    assert a.masks.shape == (6, 1, 12, 12) and float(a.masks.max()) <= 0.5
    want = nrrdd_ext.non_critical_mask(*_features(refiner, a.images), y, (12, 12), eps=0.5)
    assert torch.allclose(a.masks, want)
    assert len(refiner.hooks._handles) == 0  # hooks removed after refine


class _Stop(Exception):
    pass


@pytest.mark.parametrize("stop_after", [1, 3, 6])
def test_refine_resumes_mid_batch_to_the_same_images(stop_after):
    """A snapshot taken after iteration k, passed back as ``resume``: the same images,
    masks and log as one uninterrupted run (CPU, float32: bit for bit)."""
    refiner, _ = _refiner(iterations=7, dtype=torch.float32)
    x0, y = _batch(torch.float32, seed=torch.randint(0, 2**31, ()).item())
    seed = torch.randint(0, 2**31, ()).item()
    whole = refiner.refine(x0, y, torch.Generator().manual_seed(seed))
    saved = []

    def stop(snap):
        saved.append(snap)
        if snap["step"] == stop_after:
            raise _Stop

    with pytest.raises(_Stop):
        refiner.refine(x0, y, torch.Generator().manual_seed(seed), on_checkpoint=stop, checkpoint_every_s=0)
    assert [s["step"] for s in saved] == list(range(1, stop_after + 1))
    assert [r["iteration"] for r in saved[-1]["log"]] == [i for i in (2, 4, 6) if i <= stop_after]
    assert len(refiner.hooks._handles) == 0  # the interruption removed the hooks too
    resumed = refiner.refine(x0, y, torch.Generator().manual_seed(seed), resume=saved[-1])
    assert torch.equal(resumed.images, whole.images) and torch.equal(resumed.masks, whole.masks)
    assert resumed.log == whole.log and resumed.seconds >= saved[-1]["seconds"]


def test_refine_refuses_a_snapshot_of_another_run():
    refiner, _ = _refiner(iterations=4, dtype=torch.float32)
    x0, y = _batch(torch.float32)
    saved = []

    def stop(snap):
        saved.append(snap)
        raise _Stop

    with pytest.raises(_Stop):
        refiner.refine(x0, y, torch.Generator().manual_seed(0), checkpoint_every_s=0, on_checkpoint=stop)
    with pytest.raises(ValueError, match="4 iterations"):
        _refiner(iterations=5, dtype=torch.float32)[0].refine(x0, y, torch.Generator(), resume=saved[0])
    with pytest.raises(ValueError, match="shape"):
        refiner.refine(x0[:3], y[:3], torch.Generator(), resume=saved[0])
    with pytest.raises(ValueError, match="outside"):
        refiner.refine(x0, y, torch.Generator(), resume={**saved[0], "step": 9})


def _features(refiner, x):
    with torch.no_grad():
        return refiner.cam.forward_features(x), refiner.cam.classifier_weight()


def _cuda_refiner(iterations):
    """A float32 refiner, its teacher, clamp bounds and a batch on the GPU."""
    refiner, _ = _refiner(iterations=iterations, dtype=torch.float32)
    refiner.teacher.cuda()
    refiner.clamp_min, refiner.clamp_max = refiner.clamp_min.cuda(), refiner.clamp_max.cuda()
    x0, y = _batch(torch.float32)
    return refiner, x0.cuda(), y.cuda()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_matches_eager():
    refiner, x0, y = _cuda_refiner(iterations=8)
    eager = refiner.refine(x0, y, torch.Generator().manual_seed(1))
    refiner.config.cuda_graph = True
    graph = refiner.refine(x0, y, torch.Generator().manual_seed(1))
    assert torch.allclose(eager.images, graph.images, atol=1e-4)
    assert [r["iteration"] for r in graph.log] == [r["iteration"] for r in eager.log]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_resumes_mid_batch():
    """A CUDA-graph run stopped at a checkpoint and resumed (the graph captured anew
    after the restored step) ends where an uninterrupted eager run does."""
    refiner, x0, y = _cuda_refiner(iterations=10)
    eager = refiner.refine(x0, y, torch.Generator().manual_seed(2))
    refiner.config.cuda_graph = True
    saved = []

    def stop(snap):
        saved.append(snap)
        if snap["step"] == 5:
            raise _Stop

    with pytest.raises(_Stop):
        refiner.refine(x0, y, torch.Generator().manual_seed(2), on_checkpoint=stop, checkpoint_every_s=0)
    resumed = refiner.refine(x0, y, torch.Generator().manual_seed(2), resume=saved[-1])
    assert torch.allclose(eager.images, resumed.images, atol=1e-4)
    assert [r["iteration"] for r in resumed.log] == [r["iteration"] for r in eager.log]


# ------------------------------------------------------------------ fast path
def _fast_pair(config_kw, dtype=torch.float32, device="cpu"):
    from nrrdd.refine import fast_config

    model = small_convnet(num_classes=4, image_size=12, dtype=dtype, seed=1).to(device)
    lo, hi = torch.tensor([-1.5], device=device), torch.tensor([2.0], device=device)
    cfg = RefineConfig(iterations=5, log_every=2)
    plain = Refiner(model, cfg, lo, hi)
    fast_cfg = fast_config(cfg, device)
    fast_cfg.cuda_graph = False
    for k, v in config_kw.items():
        setattr(fast_cfg, k, v)
    fast = Refiner(model, fast_cfg, lo, hi, input_shape=(1, 12, 12))
    return plain, fast, model


def _first_gradient(refiner, x0, y):
    with refiner:
        st = refiner.prepare(x0, y, torch.Generator().manual_seed(3))
        st.step.fill_(1)
        terms = refiner.gradient(st)
    return st.x.grad.clone(), st.features.clone(), terms


@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_path_gradient_equals_plain_on_cpu(channels_last):
    """On the CPU the fast path is the BatchNorm fold and channels_last (float32; each checked):
    the first iteration's gradient, features and loss terms equal the plain path's."""
    plain, fast, model = _fast_pair({"channels_last": channels_last})
    assert fast.config.fold_bn and not fast.config.bf16
    fold = fast.fast_info["fold_bn"]
    assert len(fold["folded"]) == 3 and not fold["kept"] and fold["check_error"] < 1e-5
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the caller's model is untouched
    x0, y = _batch(torch.float32)
    g_plain, f_plain, t_plain = _first_gradient(plain, x0, y)
    g_fast, f_fast, t_fast = _first_gradient(fast, x0, y)
    assert float(g_plain.abs().max()) > 1e-4
    torch.testing.assert_close(g_fast, g_plain, rtol=1e-4, atol=1e-4 * float(g_plain.abs().max()))
    torch.testing.assert_close(f_fast, f_plain, rtol=1e-4, atol=1e-5)
    for k in ("ce", "bn", "lr", "total"):
        assert float(t_fast[k]) == pytest.approx(float(t_plain[k]), rel=1e-4), k


def test_fast_config_is_float32_fold_and_channels_last_on_cpu():
    from nrrdd.refine import fast_config

    base = RefineConfig(iterations=7, cam_eps=0.3)
    on = lambda c: (c.fold_bn, c.channels_last, c.bf16, c.cuda_graph)  # noqa: E731
    assert on(fast_config(base, "cpu")) == (True, True, False, False)
    assert on(fast_config(base, "cuda")) == (True, True, True, True)
    assert fast_config(base, "cpu").cam_eps == 0.3 and fast_config(base, "cpu").iterations == 7
    assert on(base) == (False, False, False, False)  # the given config is left as it was


def test_fast_refine_images_track_plain_on_cpu():
    plain, fast, _ = _fast_pair({})
    x0, y = _batch(torch.float32)
    a = plain.refine(x0, y, torch.Generator().manual_seed(5))
    b = fast.refine(x0, y, torch.Generator().manual_seed(5))
    moved = (a.images - x0).abs().max()
    assert float(moved) > 1e-3
    assert float((a.images - b.images).abs().max()) < 1e-3 * float(moved) + 1e-5
    assert torch.allclose(a.masks, b.masks, atol=1e-4)


def test_fold_needs_the_input_shape():
    model = small_convnet(num_classes=4, image_size=12, dtype=torch.float32, seed=1)
    with pytest.raises(ValueError, match="input_shape"):
        Refiner(model, RefineConfig(fold_bn=True))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fast_path_gradient_close_to_plain_on_cuda():
    """On CUDA the fast path adds bf16 autocast and channels_last to the fold. Its first
    gradient is held to the float32 path's (TF32 off) against bf16's own rounding:
    bf16 autocast alone on the unfolded teacher moves the gradient by some relative L2
    error e (6% on the H200 for this net); the fast path may move it by at most 2e.
    A wrong fold or a wrong folded statistic is off by O(1)."""
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        plain, fast, model = _fast_pair({}, device="cuda")
        assert fast.config.bf16 and fast.config.channels_last and fast.config.fold_bn
        lo, hi = torch.tensor([-1.5], device="cuda"), torch.tensor([2.0], device="cuda")
        bf16_only = Refiner(model, RefineConfig(iterations=5, log_every=2, bf16=True), lo, hi)
        x0, y = _batch(torch.float32)
        g_plain, _, t_plain = _first_gradient(plain, x0.cuda(), y.cuda())
        g_fast, _, t_fast = _first_gradient(fast, x0.cuda(), y.cuda())
        g_bf16, _, t_bf16 = _first_gradient(bf16_only, x0.cuda(), y.cuda())
    err_bf16 = float((g_bf16 - g_plain).norm() / g_plain.norm())
    err_fast = float((g_fast - g_plain).norm() / g_plain.norm())
    assert 0 < err_bf16 < 0.3, err_bf16
    assert err_fast < 2 * err_bf16 + 1e-3, (err_fast, err_bf16)
    dev_bf16 = abs(float(t_bf16["total"]) / float(t_plain["total"]) - 1)
    assert abs(float(t_fast["total"]) / float(t_plain["total"]) - 1) < 2 * dev_bf16 + 1e-3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fast_path_graph_matches_fast_eager_on_cuda():
    _, fast, _ = _fast_pair({}, device="cuda")
    x0, y = _batch(torch.float32)
    eager = fast.refine(x0.cuda(), y.cuda(), torch.Generator().manual_seed(1))
    fast.config.cuda_graph = True
    graph = fast.refine(x0.cuda(), y.cuda(), torch.Generator().manual_seed(1))
    assert torch.allclose(eager.images, graph.images, atol=1e-3)

"""torch.compile(fullgraph=True) on CPU through bn_stat_loss, folded_bn_stat_loss and dbr_loss,
forward and backward."""
import torch

import nrrdd_ext


def test_compile_fullgraph_bn_stat_folded_and_dbr_loss():
    torch._dynamo.reset()
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    rm, rv = 0.2 * torch.randn(4), torch.rand(4) + 0.5
    x = torch.randn(6, 3, 8, 8)
    y_org, y_aug = torch.randint(0, 10, (6,)), torch.randint(0, 10, (6,))
    d_org_t, d_aug_t = torch.rand(6) + 2.5, torch.rand(6) * 0.3
    head = torch.randn(10, 4)
    scale, shift = torch.rand(4) + 0.5, torch.randn(4)

    def step(x):
        h = conv(x)
        logits = h.mean((2, 3)) @ head.t() * 3
        return (nrrdd_ext.bn_stat_loss(h, rm, rv)
                + 0.5 * nrrdd_ext.folded_bn_stat_loss(h, scale, shift, rm, rv)
                + nrrdd_ext.dbr_loss(logits, y_org, y_aug, d_org_t, d_aug_t, r=0.4, alpha=0.7))

    compiled = torch.compile(step, fullgraph=True)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    eager = step(xe)
    out = compiled(xc)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    eager.backward()
    out.backward()
    torch.testing.assert_close(xc.grad, xe.grad, atol=1e-6, rtol=1e-4)
    assert xc.grad.abs().max() > 0
    # a second call on fresh data reuses the graph and stays equal
    x2 = torch.randn(6, 3, 8, 8)
    torch.testing.assert_close(compiled(x2), step(x2), atol=1e-5, rtol=1e-5)


def test_compile_dynamic_masked_refine_step_and_mask():
    """fullgraph with dynamic=True (symbolic batch size and float arguments): the step and
    the mask equal eager for two batch sizes without a recompile error."""
    torch._dynamo.reset()

    def step(x, grad, feats, w, y, m, v, t, lr):
        nrrdd_ext.masked_refine_step(x, grad, feats, w, y, m, v, t, lr=lr, cam_eps=0.4)
        return nrrdd_ext.non_critical_mask(feats, w, y, x.shape[-2:], eps=0.4)

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    w = torch.randn(10, 8)
    for B, lr in ((4, 0.05), (6, 0.1)):
        feats, y = torch.randn(B, 8, 3, 3), torch.randint(0, 10, (B,))
        x, grad = torch.randn(B, 2, 12, 12), torch.randn(B, 2, 12, 12)
        state = [torch.rand(B, 2, 12, 12), torch.rand(B, 2, 12, 12), torch.tensor([3.0])]
        x0, xe, se = x.clone(), x.clone(), [s.clone() for s in state]
        mask_c = compiled(x, grad, feats, w, y, *state, lr)
        mask_e = step(xe, grad, feats, w, y, *se, lr)
        torch.testing.assert_close(mask_c, mask_e)
        torch.testing.assert_close(x, xe)
        for a, b in zip(state, se):
            torch.testing.assert_close(a, b)
        assert float(state[2]) == 4.0 and float((x - x0).abs().max()) > 1e-3

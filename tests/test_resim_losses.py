"""ReSim's losses, region negatives, region pooling and collectives against direct references.

The references are written independently of the implementation: explicit python loops over windows,
images and positions, following the paper's equations (1)-(4) literally (exp / sum / log).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import resim_d2  # noqa: F401
from resim_d2.modeling import distributed as du
from resim_d2.modeling.batch_order import BatchOrder
from resim_d2.modeling.losses import (
    global_infonce,
    region_infonce,
    region_simsiam_loss,
    simsiam_loss,
)
from resim_d2.modeling.region_pooling import pool_regions, region_negatives


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _region_loss_reference(q, k, negs, valid, tau):
    """Eq. (2) as -log: for each valid window i, -log(E+ / (E+ + sum_j E-_j)), mean over valid."""
    terms = []
    for i in range(q.shape[0]):
        if not bool(valid[i]):
            continue
        e_pos = torch.exp(torch.dot(q[i], k[i]) / tau)
        e_neg = q.new_zeros(())
        for j in range(negs.shape[0]):
            e_neg = e_neg + torch.exp(torch.dot(q[i], negs[j]) / tau)
        terms.append(-torch.log(e_pos / (e_pos + e_neg)))
    return torch.stack(terms).mean()


def test_region_infonce_matches_loop_reference():
    tau = 0.2
    q = _unit(9, 6, seed=1).requires_grad_(True)
    k = _unit(9, 6, seed=2)
    negs = _unit(13, 6, seed=3)
    valid = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    loss, stats = region_infonce(q, k, negs, valid, tau)
    (grad,) = torch.autograd.grad(loss, q)
    q = q.detach()

    q_ref = q.detach().clone().requires_grad_(True)
    ref = _region_loss_reference(q_ref, k, negs, valid, tau)
    (grad_ref,) = torch.autograd.grad(ref, q_ref)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-10)
    # padded windows get exactly zero gradient
    assert torch.all(grad[~valid] == 0)

    # stats against loops
    idx = [i for i in range(9) if valid[i]]
    pos = sum(float(q[i] @ k[i]) for i in idx) / len(idx)
    neg = sum(float((q[i] @ negs.t()).mean()) for i in idx) / len(idx)
    acc = sum(float(q[i] @ k[i]) >= float((q[i] @ negs.t()).max()) for i in idx) / len(idx)
    assert math.isclose(float(stats["pos_sim"]), pos, rel_tol=1e-9)
    assert math.isclose(float(stats["neg_sim"]), neg, rel_tol=1e-9)
    assert math.isclose(float(stats["acc_top1"]), acc, rel_tol=1e-9)


def test_region_infonce_groups_use_their_own_negatives():
    """groups=G: window block g against negative block g only (per-32-image P3 negatives)."""
    tau = 0.2
    q = _unit(12, 5, seed=11).requires_grad_(True)
    k = _unit(12, 5, seed=12)
    negs = _unit(9, 5, seed=13)
    valid = torch.tensor([1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    loss, stats = region_infonce(q, k, negs, valid, tau, groups=3)
    (grad,) = torch.autograd.grad(loss, q)
    q_ref = q.detach().clone().requires_grad_(True)
    terms = []
    for g in range(3):
        rows, cols = slice(4 * g, 4 * g + 4), slice(3 * g, 3 * g + 3)
        n_valid = int(valid[rows].sum())
        block = _region_loss_reference(q_ref[rows], k[rows], negs[cols], valid[rows], tau)
        terms.append(block * n_valid)
    ref = torch.stack(terms).sum() / int(valid.sum())
    (grad_ref,) = torch.autograd.grad(ref, q_ref)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-10)
    qd = q.detach()
    own = [negs[3 * (i // 4) : 3 * (i // 4) + 3] for i in range(12)]  # the block of window i
    neg = sum(float((qd[i] @ own[i].t()).mean()) for i in range(12) if valid[i]) / int(valid.sum())
    assert math.isclose(float(stats["neg_sim"]), neg, rel_tol=1e-9)
    with pytest.raises(ValueError, match="groups=5 must divide the 12 windows and 9 negatives"):
        region_infonce(q, k, negs, valid, tau, groups=5)


def test_region_infonce_small_temperature_is_stable():
    """1/τ above the no-shift bound: exponentials are shifted per row, no overflow in float32."""
    q = _unit(7, 6, seed=14)
    k = _unit(7, 6, seed=15)
    negs = _unit(11, 6, seed=16)
    valid = torch.ones(7, dtype=torch.bool)
    for tau in (0.02, 0.005):  # |logit| up to 50 and 200: exp(200) overflows float32
        qf = q.float().requires_grad_(True)
        loss, _ = region_infonce(qf, k.float(), negs.float(), valid, tau)
        (grad,) = torch.autograd.grad(loss, qf)
        q_ref = q.clone().requires_grad_(True)
        l_pos = (q_ref * k).sum(1, keepdim=True) / tau
        logits = torch.cat([l_pos, q_ref @ negs.t() / tau], 1)  # float64 reference
        ref = (torch.logsumexp(logits, 1) - logits[:, 0]).mean()
        (grad_ref,) = torch.autograd.grad(ref, q_ref)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-4, atol=1e-3)


def test_region_infonce_bfloat16_logits_close_to_float64():
    q = _unit(64, 32, seed=17)
    k = F.normalize(q + 0.5 * _unit(64, 32, seed=18), dim=1)
    negs = _unit(500, 32, seed=19)
    valid = torch.rand(64, generator=torch.Generator().manual_seed(0)) > 0.3
    qf = q.float().requires_grad_(True)
    loss, _ = region_infonce(qf, k.float(), negs.float(), valid, 0.2, matmul_dtype=torch.bfloat16)
    (grad,) = torch.autograd.grad(loss, qf)
    q_ref = q.clone().requires_grad_(True)
    ref = _region_loss_reference(q_ref, k, negs, valid, 0.2)
    (grad_ref,) = torch.autograd.grad(ref, q_ref)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 5e-3 * ref.item()
    cos = F.cosine_similarity(grad.double().flatten(), grad_ref.flatten(), dim=0)
    assert cos > 0.999


def test_region_infonce_keys_get_no_gradient_and_denom():
    q = _unit(5, 4, seed=4).requires_grad_(True)
    k = _unit(5, 4, seed=5).requires_grad_(True)
    negs = _unit(7, 4, seed=6).requires_grad_(True)
    valid = torch.tensor([1, 1, 0, 1, 1], dtype=torch.bool)
    loss, _ = region_infonce(q, k, negs, valid, 0.5)
    loss.backward()
    assert k.grad is None and negs.grad is None and q.grad is not None
    # an explicit denominator divides the summed loss
    loss2, _ = region_infonce(q, k, negs, valid, 0.5, denom=torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(loss2, loss.detach() * 4 / 2)


def test_region_infonce_no_valid_window_is_finite_and_connected():
    q = _unit(6, 4, seed=7).float().requires_grad_(True)
    k = _unit(6, 4, seed=8).float()
    negs = _unit(10, 4, seed=9).float()
    valid = torch.zeros(6, dtype=torch.bool)
    loss, stats = region_infonce(q, k, negs, valid, 0.2)
    assert torch.isfinite(loss) and float(loss.detach()) == 0.0
    loss.backward()
    assert q.grad is not None and torch.all(q.grad == 0)
    assert all(torch.isfinite(v) for v in stats.values())
    # zero (padded, zero-area) features normalise to 0 and stay finite
    z = F.normalize(torch.zeros(3, 4), dim=1).requires_grad_(True)
    loss, _ = region_infonce(z, z.detach(), negs, torch.tensor([True, False, True]), 0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_global_infonce_matches_direct():
    tau = 0.2
    q = _unit(4, 8, seed=10).requires_grad_(True)
    k = _unit(4, 8, seed=11)
    queue = _unit(16, 8, seed=12).t().contiguous()  # (D, K)
    loss, stats = global_infonce(q, k, queue, tau)
    terms = []
    for i in range(4):
        e_pos = torch.exp(torch.dot(q[i], k[i]) / tau)
        e_neg = sum(torch.exp(torch.dot(q[i], queue[:, j]) / tau) for j in range(16))
        terms.append(-torch.log(e_pos / (e_pos + e_neg)))
    ref = torch.stack(terms).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    (g,) = torch.autograd.grad(loss, q)
    (g_ref,) = torch.autograd.grad(ref, q)
    torch.testing.assert_close(g, g_ref)
    qd = q.detach()
    acc = sum(float(qd[i] @ k[i]) > float((qd[i] @ queue).max()) for i in range(4)) / 4
    assert math.isclose(float(stats["acc_top1"]), acc)


def test_simsiam_loss_matches_direct():
    g = torch.Generator().manual_seed(13)
    p1, p2, z1, z2 = (
        torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)
    )
    loss, _ = simsiam_loss(p1, p2, z1, z2)
    ref = 0.0
    for i in range(5):
        ref = ref - 0.5 * (p1[i] @ z2[i]) / (p1[i].norm() * z2[i].norm()) / 5
        ref = ref - 0.5 * (p2[i] @ z1[i]) / (p2[i].norm() * z1[i].norm()) / 5
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert z1.grad is None and z2.grad is None  # stop-gradient on the targets
    assert p1.grad is not None and p2.grad is not None


def test_region_negatives_count_resim_c4_batch256():
    """Appendix A.1: C4, batch 256, 224 px -> 14x14 maps, 3x3 stride-1 pooling -> 12*12*256."""
    key_map = torch.randn(256, 128, 14, 14)
    negs = region_negatives(key_map, 3)
    assert negs.shape == (12 * 12 * 256, 128) == (36864, 128)
    torch.testing.assert_close(negs.norm(dim=1), torch.ones(36864))
    # P3 per GPU (batch 32 of 256 on 8 GPUs, 28x28 maps, 3x3 as the released code): 26*26*256/8
    assert region_negatives(torch.randn(32, 16, 28, 28), 3).shape[0] == 21632


def test_region_negatives_values_by_loops():
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    negs = region_negatives(x, 3)
    assert negs.shape == (2 * 3 * 2, 3)
    r = 0
    for b in range(2):
        for i in range(3):
            for j in range(2):
                mean = x[b, :, i : i + 3, j : j + 3].reshape(3, -1).mean(dim=1)
                torch.testing.assert_close(
                    negs[r].double(), mean / mean.norm(), rtol=1e-5, atol=1e-6
                )
                r += 1


@pytest.mark.parametrize("pooler", ["PrRoIPool", "ROIAlign"])
def test_pool_regions_assigns_windows_to_their_image(pooler):
    # image b's map is constant (b + 1) * (c + 1): any window inside image b pools exactly that
    B, C, H, W = 3, 2, 6, 6
    feat = (torch.arange(B).view(B, 1, 1, 1) + 1.0) * (torch.arange(C).view(1, C, 1, 1) + 1.0)
    feat = feat.expand(B, C, H, W).contiguous()
    boxes = torch.tensor([[8.0, 8.0, 40.0, 40.0], [16.0, 0.0, 64.0, 48.0]]).expand(B, 2, 4)
    out = pool_regions(feat, boxes, 1 / 16, pooler)
    assert out.shape == (B, 2, C)
    for b in range(B):
        for m in range(2):
            torch.testing.assert_close(out[b, m], (b + 1.0) * torch.tensor([1.0, 2.0]))


def test_pool_regions_prroi_is_exact_average_of_bilinear_map():
    # a map linear in x is its own bilinear interpolation; the 1x1 PrRoIPool of [x0, x1] (feature
    # coordinates, inside the map) is its average over the box, i.e. the value at the box centre.
    W = 8
    feat = torch.arange(W, dtype=torch.float32).view(1, 1, 1, W).expand(1, 1, 5, W).contiguous()
    boxes = torch.tensor([[[16.0, 16.0, 48.0, 48.0], [8.0, 0.0, 104.0, 64.0]]])
    out = pool_regions(feat, boxes, 1 / 16, "PrRoIPool")
    torch.testing.assert_close(out[0, :, 0], torch.tensor([2.0, 3.5]))


def test_distributed_helpers_are_noops_in_one_process():
    x = torch.randn(3, 2)
    assert du.concat_all_gather(x) is x
    assert du.all_reduce_mean(x) is x
    order = BatchOrder()  # one process, one group, no shuffle: the batch as it is
    assert order.is_identity and order.to_encoder(x) is x and order.to_batch(x) is x


# ----------------------------------------------------------------------- ReSim on SimSiam (Table 7)
def test_region_simsiam_loss_matches_loop_reference():
    g = torch.Generator().manual_seed(31)
    p1, p2, z1, z2 = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(4))
    p1.requires_grad_(True)
    z2.requires_grad_(True)
    valid = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    loss, stats = region_simsiam_loss(p1, p2, z1, z2, valid)
    terms = []
    for i in range(6):
        if valid[i]:
            c1 = torch.dot(p1[i], z2[i]) / (p1[i].norm() * z2[i].norm())
            c2 = torch.dot(p2[i], z1[i]) / (p2[i].norm() * z1[i].norm())
            terms.append(-(c1 + c2) / 2)
    ref = torch.stack(terms).mean()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats["pos_sim"], -ref.detach(), rtol=1e-12, atol=1e-12)
    gp, gz = torch.autograd.grad(loss, (p1, z2), allow_unused=True)
    assert gz is None  # stop-gradient on the projections
    assert torch.all(gp[~valid] == 0) and torch.all(gp[valid].abs().sum(1) > 0)


def test_masked_batch_norm_uses_only_valid_rows():
    from resim_d2.modeling.heads import MaskedBatchNorm1d

    g = torch.Generator().manual_seed(32)
    x = torch.randn(10, 4, generator=g, dtype=torch.float64) * 3 + 1
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    ours = MaskedBatchNorm1d(4).double()
    ref = torch.nn.BatchNorm1d(4).double()  # torch's own BN on the valid rows only
    with torch.no_grad():
        ours.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        ours.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
        ref.load_state_dict(ours.state_dict())
    x_bad = x.clone()
    x_bad[~mask] = 1e6  # padded rows must not matter
    out = ours(x_bad, mask)
    torch.testing.assert_close(out[mask], ref(x[mask]))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    # no valid row: finite output, running statistics unchanged
    before = ours.running_mean.clone()
    out = ours(x, torch.zeros(10, dtype=torch.bool))
    assert torch.isfinite(out).all() and torch.equal(ours.running_mean, before)
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x, mask), ref(x))  # eval: running statistics, mask ignored


def test_masked_batch_norm_gradients_equal_batch_norm_on_the_valid_rows():
    from resim_d2.modeling.heads import MaskedBatchNorm1d

    g = torch.Generator().manual_seed(35)
    x = torch.randn(9, 3, generator=g, dtype=torch.float64) * 2 - 1
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    upstream = torch.randn(9, 3, generator=g, dtype=torch.float64)
    ours = MaskedBatchNorm1d(3).double()
    with torch.no_grad():
        ours.weight.copy_(torch.tensor([0.5, -2.0, 1.5]))
        ours.bias.copy_(torch.tensor([1.0, 0.0, -0.5]))
    ref = torch.nn.BatchNorm1d(3).double()
    ref.load_state_dict(ours.state_dict())
    xo, xr = x.clone().requires_grad_(), x[mask].clone().requires_grad_()
    (ours(xo, mask)[mask] * upstream[mask]).sum().backward()
    (ref(xr) * upstream[mask]).sum().backward()
    torch.testing.assert_close(xo.grad[mask], xr.grad)
    assert torch.all(xo.grad[~mask] == 0)  # padding gets no gradient through the statistics
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad)


def test_masked_batch_norm_keeps_float32_statistics_under_bfloat16_inputs():
    from resim_d2.modeling.heads import MaskedBatchNorm1d

    g = torch.Generator().manual_seed(33)
    x = (torch.randn(4096, 3, generator=g) * 0.01 + 100.0).bfloat16()  # mean >> std
    mask = torch.ones(4096, dtype=torch.bool)
    out = MaskedBatchNorm1d(3, affine=False)(x, mask)
    ref = torch.nn.BatchNorm1d(3, affine=False)(x.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)


def test_region_simsiam_within_image_stats_by_loops():
    g = torch.Generator().manual_seed(34)
    B, M, D = 3, 4, 5
    p1, p2, z1, z2 = (torch.randn(B * M, D, generator=g, dtype=torch.float64) for _ in range(4))
    valid = torch.tensor([1, 1, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1], dtype=torch.bool)
    _, stats = region_simsiam_loss(p1, p2, z1, z2, valid, windows_per_image=M)
    hits, negs = [], []
    for b in range(B):
        keys = [j for j in range(M) if valid[b * M + j]]
        for i in keys:
            q = p1[b * M + i] / p1[b * M + i].norm()
            cos = {j: float(q @ z2[b * M + j] / z2[b * M + j].norm()) for j in keys}
            hits.append(max(cos, key=cos.get) == i)
            if len(keys) > 1:
                negs.append(sum(cos[j] for j in keys if j != i) / (len(keys) - 1))
    assert math.isclose(float(stats["acc_top1"]), sum(hits) / len(hits), rel_tol=1e-12)
    assert math.isclose(float(stats["neg_sim"]), sum(negs) / len(negs), rel_tol=1e-9)

"""GroupBatchNorm2d against torch.nn.BatchNorm2d applied to each group on its own: outputs,
gradients and running statistics, in float32 and under bfloat16 autocast, contiguous and
channels-last; the conversion keeps state-dict keys; the group-order helpers invert each other."""

import copy

import pytest
import torch
from torch import nn

from resim_d2.layers.group_batch_norm import (
    GroupBatchNorm2d,
    convert_group_batchnorm,
    deinterleave_groups,
    interleave_groups,
    num_groups,
)

C, GROUPS, PER_GROUP = 5, 3, 4
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _reference_bn(seed=0):
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(C)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1.0, 1.0)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return bn


def _step(module, x, grad_out, autocast):
    """One forward/backward; returns (output, input gradient, weight grad, bias grad)."""
    x = x.detach().clone().requires_grad_(True)
    ctx = (
        torch.autocast(x.device.type, dtype=torch.bfloat16)
        if autocast
        else torch.autocast(x.device.type, enabled=False)
    )
    with ctx:
        y = module(x)
    (y.float() * grad_out).sum().backward()
    return y, x.grad, module.weight.grad, module.bias.grad


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, cuda])])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_equals_batchnorm2d_applied_to_each_group(channels_last, precision, device):
    g = torch.Generator().manual_seed(1)
    N = GROUPS * PER_GROUP
    # an offset mean, as conv outputs have, so that the statistics are not trivially ~0
    x = torch.randn(N, C, 6, 5, generator=g) * 2.0 + 1.5
    if precision == "bf16":
        x = x.bfloat16()  # what a convolution under bfloat16 autocast hands its batch norm
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(device)
    grad_out = torch.randn(x.shape, generator=g).to(device)
    bn = _reference_bn().to(device)
    gbn = GroupBatchNorm2d(C, PER_GROUP).to(device)
    gbn.load_state_dict(bn.state_dict())
    y, dx, dw, db = _step(gbn, x, grad_out, precision == "bf16")

    assert y.dtype == x.dtype and y.shape == x.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)
    # reference: one BatchNorm2d per group, group k holding samples k, k+G, k+2G, ...
    refs, y_ref, dx_ref = [], torch.empty_like(y), torch.empty_like(dx)
    for k in range(GROUPS):
        r = copy.deepcopy(bn)
        yk, dxk, _, _ = _step(r, x[k::GROUPS], grad_out[k::GROUPS], precision == "bf16")
        y_ref[k::GROUPS], dx_ref[k::GROUPS] = yk, dxk
        refs.append(r)
    tol = dict(rtol=1e-5, atol=1e-5) if precision == "fp32" else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.float(), y_ref.float(), **tol)
    torch.testing.assert_close(dx.float(), dx_ref.float(), **tol)
    # the affine parameters are shared by the groups: their gradients add up. Worked out in
    # float64 from the formula (db = sum of dL/dy, dw = sum of dL/dy * x_hat per group), not from
    # the per-group references: in bfloat16 channels-last, BatchNorm2d's CPU backward sums each
    # small group in low precision and the reference's bias gradient is off by 0.05 of 1.2.
    gy = grad_out.to(y.dtype).double().cpu()
    xd = x.double().cpu()
    xhat = torch.empty_like(xd)
    for k in range(GROUPS):
        xk = xd[k::GROUPS]
        mean, var = xk.mean((0, 2, 3), keepdim=True), xk.var(
            (0, 2, 3), unbiased=False, keepdim=True
        )
        xhat[k::GROUPS] = (xk - mean) / torch.sqrt(var + bn.eps)
    torch.testing.assert_close(dw.double().cpu(), (gy * xhat).sum((0, 2, 3)), **tol)
    torch.testing.assert_close(db.double().cpu(), gy.sum((0, 2, 3)), **tol)
    # one batch norm's running statistics: the mean over groups of each group's update
    for name in ("running_mean", "running_var"):
        mean = sum(getattr(r, name) for r in refs) / GROUPS
        torch.testing.assert_close(getattr(gbn, name), mean, rtol=1e-5, atol=1e-6)
    assert int(gbn.num_batches_tracked) == 1
    # and it is not plain batch norm over the whole batch (the test can fail)
    whole = copy.deepcopy(bn)
    with torch.no_grad():
        assert not torch.allclose(whole(x.float()), y.float(), atol=1e-2)
    if device == "cuda":  # the same layer on the CPU gives the same numbers
        cpu = GroupBatchNorm2d(C, PER_GROUP)
        cpu.load_state_dict(_reference_bn().state_dict())
        y_cpu, dx_cpu, _, _ = _step(cpu, x.cpu(), grad_out.cpu(), precision == "bf16")
        torch.testing.assert_close(y.cpu().float(), y_cpu.float(), **tol)
        torch.testing.assert_close(dx.cpu().float(), dx_cpu.float(), **tol)


def test_one_group_eval_and_no_grouping_are_batchnorm2d():
    bn = _reference_bn()
    x = torch.randn(4, C, 3, 3) + 1.0
    for group_size, batch in ((0, 4), (4, 4), (8, 4)):  # off, N == group, N < group
        gbn = GroupBatchNorm2d(C, group_size)
        gbn.load_state_dict(bn.state_dict())
        r = copy.deepcopy(bn)
        torch.testing.assert_close(gbn(x[:batch]), r(x[:batch]))
        torch.testing.assert_close(gbn.running_var, r.running_var)
    gbn = GroupBatchNorm2d(C, 2).eval()
    gbn.load_state_dict(bn.state_dict())
    torch.testing.assert_close(gbn(x), bn.eval()(x))  # running statistics, no groups


def test_momentum_none_is_a_cumulative_average_over_steps():
    bn = nn.BatchNorm2d(C, momentum=None)
    gbn = GroupBatchNorm2d(C, 2, momentum=None)
    gbn.load_state_dict(bn.state_dict())
    batches = [torch.randn(4, C, 3, 3) * (i + 1) + i for i in range(3)]
    refs = [copy.deepcopy(bn) for _ in range(2)]
    for x in batches:
        gbn(x)
        for k, r in enumerate(refs):
            r(x[k::2])
    torch.testing.assert_close(gbn.running_mean, (refs[0].running_mean + refs[1].running_mean) / 2)
    torch.testing.assert_close(gbn.running_var, (refs[0].running_var + refs[1].running_var) / 2)


def test_batch_must_be_a_multiple_of_the_group():
    with pytest.raises(ValueError, match="RESIM.BN_GROUP_IMAGES is 4, but this process has 6"):
        GroupBatchNorm2d(C, 4)(torch.randn(6, C, 2, 2))
    assert num_groups(64, 32) == 2 and num_groups(32, 32) == 1 and num_groups(7, 0) == 1


def test_conversion_keeps_state_dict_and_skips_other_norms():
    from detectron2.layers import FrozenBatchNorm2d

    net = nn.Sequential(
        nn.Conv2d(3, C, 3),
        nn.BatchNorm2d(C),
        nn.Sequential(nn.BatchNorm2d(C), nn.SyncBatchNorm(C), FrozenBatchNorm2d(C)),
    )
    before = {k: v.clone() for k, v in net.state_dict().items()}
    weight = net[1].weight
    convert_group_batchnorm(net, 2)
    assert type(net[1]) is GroupBatchNorm2d and type(net[2][0]) is GroupBatchNorm2d
    assert type(net[2][1]) is nn.SyncBatchNorm and type(net[2][2]) is FrozenBatchNorm2d
    assert net[1].weight is weight  # the same parameter object: optimizers keep working
    after = net.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_interleave_and_back():
    x = torch.arange(12).view(6, 2)
    y = interleave_groups(x, 3)
    # groups of consecutive rows (0,1), (2,3), (4,5) become rows k with k % 3 == group
    assert y[:, 0].tolist() == [0, 4, 8, 2, 6, 10]
    assert torch.equal(deinterleave_groups(y, 3), x)
    assert interleave_groups(x, 1) is x

"""ReSim in two gloo processes on the CPU: collectives, shuffle-BN, the region loss's normaliser and
DDP steps against one process."""

import torch
import torch.nn.functional as F
from helpers.processes import run_gloo_workers
from helpers.resim_model import (
    build,
    loss_values,
    make_batch,
    tiny_resim_gn_cfg,
    total_loss,
)

import resim_d2  # noqa: F401  (compat + registers ReSim)


def _gloo_worker(rank, world, init_file, out_file):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from resim_d2.modeling import distributed as du
    from resim_d2.modeling.batch_order import BatchOrder
    from resim_d2.modeling.losses import region_infonce

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        res = {}
        # collectives
        x = torch.arange(4, dtype=torch.float32).view(2, 2) + 10 * rank
        res["gathered"] = du.concat_all_gather(x)
        res["mean"] = du.all_reduce_mean(torch.tensor(float(rank)))
        order = BatchOrder(shuffle=True, batch=2, device=x.device)  # shuffle-BN's order
        xs, ys = order.to_encoder(x), order.to_encoder(2 * x)
        res.update(xs=xs, ys=ys, back=order.to_batch(xs))
        # region-loss normaliser: mean over ranks of the valid count (3 valid on rank 0, 1 on 1)
        g = torch.Generator().manual_seed(20)
        q_all, k_all, negs = (
            F.normalize(torch.randn(n, 4, generator=g, dtype=torch.float64), dim=1)
            for n in (8, 8, 6)
        )
        valid_all = torch.tensor([1, 1, 1, 0, 0, 1, 0, 0], dtype=torch.bool)
        sl = slice(4 * rank, 4 * rank + 4)
        q = q_all[sl].clone().requires_grad_(True)
        denom = du.all_reduce_mean(valid_all[sl].double().sum()).clamp_min(1.0 / world)
        loss, _ = region_infonce(q, k_all[sl], negs, valid_all[sl], 0.2, denom)
        loss.backward()
        res.update(region_loss=loss.detach(), region_grad=q.grad)
        # the model: shuffle-BN on and off, then two DDP steps (no unused-parameter error)
        cfg = tiny_resim_gn_cfg()
        batch = make_batch(cfg, B=4, seed=3)[2 * rank : 2 * rank + 2]
        for mode in ("shuffle", "off"):
            model = build(cfg)
            model.train()
            model.objective.shuffle_bn = mode == "shuffle"
            res[mode] = loss_values(model(batch))
        ddp = DDP(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        for _ in range(2):
            opt.zero_grad()
            total_loss(ddp(batch)).backward()
            opt.step()
        torch.save(res, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_gloo_collectives_shuffle_bn_and_normalisation():

    world = 2
    outs = run_gloo_workers(_gloo_worker, world)
    # collectives
    xs = [torch.arange(4, dtype=torch.float32).view(2, 2) + 10 * r for r in range(world)]
    for r, o in enumerate(outs):
        torch.testing.assert_close(o["gathered"], torch.cat(xs))
        assert float(o["mean"]) == 0.5
        torch.testing.assert_close(o["back"], xs[r])
        torch.testing.assert_close(o["ys"], 2 * o["xs"])  # one permutation for all tensors
    assert sorted(map(tuple, torch.cat([o["xs"] for o in outs]).tolist())) == sorted(
        map(tuple, torch.cat(xs).tolist())
    )
    # DDP-averaged region loss / gradient = one-process mean over all valid windows
    from resim_d2.modeling.losses import region_infonce

    g = torch.Generator().manual_seed(20)
    q_all, k_all, negs = (
        F.normalize(torch.randn(n, 4, generator=g, dtype=torch.float64), dim=1) for n in (8, 8, 6)
    )
    valid_all = torch.tensor([1, 1, 1, 0, 0, 1, 0, 0], dtype=torch.bool)
    q_ref = q_all.clone().requires_grad_(True)
    ref, _ = region_infonce(q_ref, k_all, negs, valid_all, 0.2)
    ref.backward()
    torch.testing.assert_close(sum(o["region_loss"] for o in outs) / world, ref.detach())
    torch.testing.assert_close(torch.cat([o["region_grad"] for o in outs]) / world, q_ref.grad)
    # shuffle-BN changes nothing per rank: keys, key windows, per-rank negatives come back right
    for o in outs:
        for k in o["off"]:
            torch.testing.assert_close(o["shuffle"][k], o["off"][k], rtol=1e-5, atol=1e-5)
    # gathered terms (global queue loss, p4 with gathered negatives) and p3, whose negatives are
    # grouped per 2 images (= per rank here), match one process on 4 images
    cfg = tiny_resim_gn_cfg()
    model = build(cfg)
    model.train()
    single = loss_values(model(make_batch(cfg, B=4, seed=3)))
    for k in ("loss_global", "loss_region_p3", "loss_region_p4"):
        torch.testing.assert_close(
            sum(o["shuffle"][k] for o in outs) / world, single[k], rtol=1e-5, atol=1e-5
        )

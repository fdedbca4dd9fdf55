"""ReSim's objectives as pure functions (paper eq. 1-5).

Each returns ``(loss, stats)``: ``loss`` a 0-dim float tensor with gradient, ``stats`` a dict of
0-dim detached tensors for logging (no host synchronisation happens here). Inputs are expected in
float32 (the model computes its losses outside autocast). Keys and negatives are treated as
constants: they are detached here, whatever the caller passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["region_infonce", "global_infonce", "simsiam_loss", "region_simsiam_loss"]


# Above this bound on |logit| (1 / temperature for unit vectors) the exponentials are shifted by
# each row's largest logit; below it exp cannot overflow float32 / bfloat16 (e^30 * 1e7 < 3e38) and
# the shift (one more pass over the logits) is skipped.
_NO_SHIFT_BOUND = 30.0


class _NegativeLogSumExp(torch.autograd.Function):
    """Cross-entropy with label 0 of ``[l_pos, qs . negatives]`` per row, memory- and pass-lean.

    forward(qs (G, R, D), l_pos (G, R), negatives (G, N, D), bound) ->
    (ce (G, R), neg_max (G, R), no gradient), both in l_pos's dtype (float32 or float64).

    The (G, R, N) logits are written once by ``bmm`` (in the dtype of ``negatives``: float32, or
    bfloat16 under mixed precision, accumulated in float32), exponentiated in place and kept for
    the backward pass, which is one more ``bmm``: d ce_i / d qs_i = sum_j p_ij n_j and
    d ce_i / d l_pos_i = p_i0 - 1. Autograd through the plain formula would keep the logits, their
    concatenation with the positives, the scaled logits and the softmax (four such tensors).
    """

    @staticmethod
    def forward(ctx, qs, l_pos, negatives, bound):
        acc = torch.promote_types(negatives.dtype, l_pos.dtype)  # float32 or float64
        e = torch.bmm(qs.to(negatives.dtype), negatives.transpose(1, 2))  # (G, R, N) logits
        neg_max = e.amax(dim=2).to(acc)
        if bound > _NO_SHIFT_BOUND:
            shift = torch.maximum(neg_max, l_pos)  # (G, R)
            e.sub_(shift.to(e.dtype)[..., None])
        else:
            shift = torch.zeros_like(l_pos)
        e.exp_()
        s_neg = e.sum(dim=2, dtype=acc)
        lse = shift + torch.log(s_neg + torch.exp(l_pos - shift))
        ctx.save_for_backward(e, negatives, lse, shift, l_pos)
        ctx.qs_dtype = qs.dtype
        ctx.mark_non_differentiable(neg_max)
        return lse - l_pos, neg_max

    @staticmethod
    def backward(ctx, grad_ce, _grad_neg_max):
        e, negatives, lse, shift, l_pos = ctx.saved_tensors
        grad_qs = grad_lpos = None
        if ctx.needs_input_grad[0]:
            row = grad_ce * torch.exp(shift - lse)  # p_ij = e_ij * exp(shift_i - lse_i)
            grad_qs = torch.bmm(e, negatives).to(row.dtype).mul_(row[..., None]).to(ctx.qs_dtype)
        if ctx.needs_input_grad[1]:
            grad_lpos = grad_ce * (torch.exp(l_pos - lse) - 1.0)
        return grad_qs, grad_lpos, None, None


def region_infonce(
    q: torch.Tensor,
    k: torch.Tensor,
    negatives: torch.Tensor,
    valid: torch.Tensor,
    temperature: float,
    denom: torch.Tensor | None = None,
    groups: int = 1,
    matmul_dtype: torch.dtype | None = None,
):
    """Region-level InfoNCE (paper eq. 2, as -log of the ratio), averaged over valid windows.

    For each valid window i: ``logits_i = [q_i . k_i, q_i . n_1, ..., q_i . n_N] / temperature`` and
    ``loss_i = -log softmax(logits_i)[0]``. The negatives are every pooled key-map position of the
    (gathered) batch, the positive's own location included (as the released code).

    Args:
        q: (R, D) L2-normalised query-window features, R = windows of all images (padded ones too).
        k: (R, D) L2-normalised key-window features, row i the positive of q[i].
        negatives: (N, D) L2-normalised negative features.
        valid: (R,) bool, which rows are real windows. Padded rows contribute 0 to the loss (but
            stay in the graph, so a batch with no valid window gives a finite 0 loss whose gradient
            reaches every parameter that produced ``q``).
        temperature: τ.
        denom: optional 0-dim tensor to divide the summed loss by; default ``max(valid.sum(), 1)``.
            The model passes the mean over ranks of the valid count, so that the DDP-averaged
            gradient equals that of the mean over all valid windows of the global batch.
        groups: split the rows of ``q`` and of ``negatives`` into this many equal consecutive
            blocks; the windows of block g are contrasted with the negatives of block g only
            (e.g. P3 negatives per 32 images, as the released code's per-GPU set).
        matmul_dtype: dtype of the (R, N) logits (default: that of ``q``); ``torch.bfloat16``
            under bf16 mixed precision. Sums, logs and the loss stay in float32 or wider.

    Returns:
        loss: 0-dim tensor.
        stats: {"pos_sim", "neg_sim", "acc_top1"} means over valid windows (0 when none), detached.
    """
    R, D = q.shape
    N = negatives.shape[0]
    if groups < 1 or R % groups or N % groups:
        raise ValueError(
            f"region_infonce: groups={groups} must divide the {R} windows and {N} negatives"
        )
    k = k.detach()
    negatives = negatives.detach().to(matmul_dtype or q.dtype).view(groups, N // groups, D)
    validf = valid.to(q.dtype)
    count = validf.sum().clamp_min(1.0)
    if denom is None:
        denom = count
    qs = q / temperature
    l_pos = (qs * k).sum(dim=1)  # (R,) scaled positive logits
    ce, neg_max = _NegativeLogSumExp.apply(
        qs.view(groups, R // groups, D),
        l_pos.view(groups, R // groups),
        negatives,
        1.0 / temperature,
    )
    loss = (ce.reshape(R) * validf).sum() / denom
    with torch.no_grad():
        wide = torch.promote_types(negatives.dtype, l_pos.dtype)
        mean_neg = negatives.to(wide).mean(dim=1, keepdim=True)  # (G, 1, D)
        q_rows = q.detach().to(wide).view(groups, R // groups, D)
        neg_mean = torch.bmm(mean_neg, q_rows.transpose(1, 2))  # (G, 1, R) mean of q . n
        values = torch.stack(
            [
                l_pos * temperature,
                neg_mean.reshape(R).to(l_pos.dtype),
                (l_pos >= neg_max.reshape(R).to(l_pos.dtype)).to(l_pos.dtype),
            ]
        )  # (3, R)
        means = (values * validf.to(values.dtype)).sum(dim=1) / count
        stats = dict(zip(("pos_sim", "neg_sim", "acc_top1"), means.to(q.dtype).unbind()))
    return loss, stats


def global_infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float):
    """MoCo's image-level InfoNCE (paper eq. 3-4), averaged over the batch.

    Args:
        q: (B, D) L2-normalised query embeddings.
        k: (B, D) L2-normalised key embeddings (positives), row i for q[i].
        queue: (D, K) L2-normalised negative keys (column j is one key).
        temperature: τ.

    Returns:
        loss: 0-dim tensor, mean over i of ``-log softmax([q_i.k_i, q_i.queue] / τ)[0]``.
        stats: {"pos_sim", "neg_sim", "acc_top1"} batch means, detached.
    """
    k = k.detach()
    queue = queue.detach()
    l_pos = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
    l_neg = q @ queue  # (B, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    loss = F.cross_entropy(logits, labels)
    with torch.no_grad():
        stats = {
            "pos_sim": l_pos.mean(),
            "neg_sim": l_neg.mean(),
            "acc_top1": (logits.argmax(dim=1) == 0).to(q.dtype).mean(),
        }
    return loss, stats


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor):
    """SimSiam's symmetric negative cosine similarity with stop-gradient on the targets.

    ``loss = -(cos(p1, sg(z2)).mean() + cos(p2, sg(z1)).mean()) / 2``, minimum -1.

    Args:
        p1, p2: (B, D) predictor outputs of view 1 / view 2 (not normalised).
        z1, z2: (B, D) projector outputs of view 1 / view 2 (not normalised; detached here).

    Returns:
        loss: 0-dim tensor.
        stats: {"pos_sim": mean cos(p, sg(z)) over both directions, "neg_sim": mean cos(p1_i, z2_j)
        over i != j, "acc_top1": fraction of i whose nearest z2 (by cosine to p1_i) is z2_i,
        "z_std": std of the L2-normalised z1 per dimension averaged (collapse indicator; 1/sqrt(D)
        is healthy)}, detached.
    """
    z1 = z1.detach()
    z2 = z2.detach()
    c1 = F.cosine_similarity(p1, z2, dim=1)
    c2 = F.cosine_similarity(p2, z1, dim=1)
    loss = -(c1.mean() + c2.mean()) / 2
    with torch.no_grad():
        pn = F.normalize(p1, dim=1)
        zn = F.normalize(z2, dim=1)
        sim = pn @ zn.t()  # (B, B)
        b = sim.shape[0]
        off = ~torch.eye(b, dtype=torch.bool, device=sim.device)
        neg = (sim * off).sum() / max(b * (b - 1), 1)
        stats = {
            "pos_sim": (c1.mean() + c2.mean()) / 2,
            "neg_sim": neg,
            "acc_top1": (sim.argmax(dim=1) == torch.arange(b, device=sim.device))
            .to(sim.dtype)
            .mean(),
            "z_std": F.normalize(z1, dim=1).std(dim=0).mean(),
        }
    return loss, stats


def region_simsiam_loss(
    p1: torch.Tensor,
    p2: torch.Tensor,
    z1: torch.Tensor,
    z2: torch.Tensor,
    valid: torch.Tensor,
    denom: torch.Tensor | None = None,
    windows_per_image: int | None = None,
):
    """SimSiam's symmetric negative cosine per window pair, averaged over valid windows.

    For window i (query view 1, key view 2): ``-(cos(p1_i, sg(z2_i)) + cos(p2_i, sg(z1_i))) / 2``.

    Args:
        p1, p2: (R, D) predictions of the query / key windows.
        z1, z2: (R, D) projections of the query / key windows (detached here).
        valid: (R,) bool; padded windows contribute 0 (and stay in the graph).
        denom: optional 0-dim tensor to divide the summed loss by (default ``max(valid.sum(), 1)``),
            as in :func:`region_infonce`.
        windows_per_image: M when the rows are M windows per image, image-major; adds the
            within-image stats below.

    Returns:
        loss: 0-dim tensor, minimum -1.
        stats: {"pos_sim": mean cosine over valid windows and both directions, "z_std": std of the
        L2-normalised z1 over valid windows per dimension, averaged (collapse indicator)}; with
        ``windows_per_image`` also "acc_top1": fraction of valid query windows whose prediction
        p1 is closest (cosine) to their own key window's z2 among the valid key windows of the same
        image, and "neg_sim": mean cosine of p1 to the image's other valid key windows.
    """
    validf = valid.to(p1.dtype)
    count = validf.sum().clamp_min(1.0)
    if denom is None:
        denom = count
    c = (
        F.cosine_similarity(p1, z2.detach(), dim=1) + F.cosine_similarity(p2, z1.detach(), dim=1)
    ) / 2  # (R,)
    loss = -(c * validf).sum() / denom
    with torch.no_grad():
        zn = F.normalize(z1.detach(), dim=1)
        mean = (zn * validf[:, None]).sum(0) / count
        var = ((zn - mean).square() * validf[:, None]).sum(0) / (count - 1).clamp_min(1.0)
        stats = {"pos_sim": (c.detach() * validf).sum() / count, "z_std": var.sqrt().mean()}
        if windows_per_image:
            M = windows_per_image
            B = p1.shape[0] // M
            pn = F.normalize(p1.detach(), dim=1).view(B, M, -1)
            kn = F.normalize(z2.detach(), dim=1).view(B, M, -1)
            sim = pn @ kn.transpose(1, 2)  # (B, M, M): query window i vs key window j
            vm = valid.view(B, M)
            cols = vm[:, None, :].expand(B, M, M)
            own = torch.arange(M, device=sim.device)
            best = sim.masked_fill(~cols, float("-inf")).argmax(dim=2)  # (B, M)
            stats["acc_top1"] = ((best == own).to(p1.dtype) * vm).sum() / count
            others = cols & (own[:, None] != own[None, :])
            n_other = others.sum(dim=2)
            row = (sim * others).sum(dim=2) / n_other.clamp_min(1)
            rows = vm & (n_other > 0)
            stats["neg_sim"] = (row * rows).sum() / rows.sum().clamp_min(1)
    return loss, stats

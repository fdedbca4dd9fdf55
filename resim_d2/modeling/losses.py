"""ReSim's objectives as pure functions (paper eq. 1-5).

Each returns ``(loss, stats)``: ``loss`` a 0-dim float tensor with gradient, ``stats`` a dict of
0-dim detached tensors for logging (no host synchronisation happens here). Inputs are expected in
float32 (the model computes its losses outside autocast). Keys and negatives are treated as
constants: they are detached here, whatever the caller passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["region_infonce", "global_infonce", "simsiam_loss"]


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / count


def region_infonce(
    q: torch.Tensor,
    k: torch.Tensor,
    negatives: torch.Tensor,
    valid: torch.Tensor,
    temperature: float,
    denom: torch.Tensor | None = None,
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

    Returns:
        loss: 0-dim tensor.
        stats: {"pos_sim", "neg_sim", "acc_top1"} means over valid windows (0 when none), detached.
    """
    k = k.detach()
    negatives = negatives.detach()
    validf = valid.to(q.dtype)
    count = validf.sum().clamp_min(1.0)
    if denom is None:
        denom = count
    l_pos = (q * k).sum(dim=1, keepdim=True)  # (R, 1)
    l_neg = q @ negatives.t()  # (R, N)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # (R, 1 + N)
    ce = torch.logsumexp(logits, dim=1) - logits[:, 0]  # (R,)  = cross-entropy with label 0
    loss = (ce * validf).sum() / denom
    with torch.no_grad():
        stats = {
            "pos_sim": _masked_mean(l_pos[:, 0], validf, count),
            "neg_sim": _masked_mean(l_neg.mean(dim=1), validf, count),
            "acc_top1": _masked_mean((logits.argmax(dim=1) == 0).to(q.dtype), validf, count),
        }
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

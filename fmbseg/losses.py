"""TSupCon: the text-anchored supervised contrastive loss of FMbSeg Stage 2 (DESIGN §1, exact).

With z_1..z_M the kept patch embeddings, y_i their labels, t_1..t_K the text anchors and s(a, b) = a·b / τ
(all vectors L2-normalised here):
- l_t(i)  = -s(z_i, t_{y_i}) + log( Σ_k exp s(z_i, t_k) + Σ_{j≠i} exp s(z_i, z_j) )
- L_t(k)  = mean of l_t(i) over the patches labelled k, 0 for a class no patch has
- l_im(i) = mean over l ≠ i with y_l = y_i of ( -s(z_i, z_l) + log Σ_{j≠i} exp s(z_i, z_j) ), 0 without positives
- loss    = ( Σ_k L_t(k) + Σ_i l_im(i) ) / (M + K)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Stands in for -inf on the excluded diagonal: exp() of it is exactly 0, yet a row made only of it keeps
# logsumexp's gradient finite (a true -inf row gives nan gradients even when the row is not used).
_EXCLUDED = -1.0e30


def tsupcon(z: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The scalar TSupCon loss.

    z: (M, D) patch embeddings; labels: (M,) int, negative = ignored (dropped before anything is computed);
    text: (K, D) class text embeddings, row k anchors label k. Computed in float32 whatever the input dtype,
    with one (M', M') similarity matrix (M' = kept patches) and one logsumexp over it; positives are counted
    through per-class sums of z, so no (M', M') mask is built and M in the thousands is fine.
    A batch with no kept patch returns a zero that still carries a (zero) gradient to z.
    """
    if z.ndim != 2 or text.ndim != 2 or labels.ndim != 1:
        raise ValueError(f"tsupcon expects z (M, D), labels (M,), text (K, D); got {tuple(z.shape)}, "
                         f"{tuple(labels.shape)}, {tuple(text.shape)}")
    if z.shape[0] != labels.shape[0]:
        raise ValueError(f"z has {z.shape[0]} rows but labels has {labels.shape[0]}")
    if z.shape[1] != text.shape[1]:
        raise ValueError(f"z has dimension {z.shape[1]} but text embeddings have {text.shape[1]}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    num_classes = text.shape[0]
    # Ignored patches are dropped where the labels live: labels on the host (as Stage-2 training passes them)
    # cost no device sync, since the kept rows are gathered by an index tensor sent to z's device.
    labels = labels.to(torch.long)
    keep = labels >= 0
    if bool((labels[keep] >= num_classes).any()):
        raise ValueError(f"labels must be < K = {num_classes} (or negative for ignore); max is {int(labels.max())}")
    kept = keep.nonzero().squeeze(1)                   # (M',) on the labels' device
    m = int(kept.shape[0])
    y = labels.index_select(0, kept).to(z.device)
    z = F.normalize(z.index_select(0, kept.to(z.device)).float(), dim=-1)
    if m == 0:
        return z.sum() * 0.0
    t = F.normalize(text.to(z.device).float(), dim=-1)

    s_zt = z @ t.T / temperature                       # (M, K)
    s_zz = z @ z.T / temperature                       # (M, M), the only M² tensor the loss keeps
    # j ≠ i: the diagonal is overwritten in place (autograd routes no gradient through it), so no eye mask and
    # no masked copy of the matrix are made.
    s_zz.diagonal().fill_(_EXCLUDED)

    # The one pass over the M² similarities: log Σ_{j≠i} exp s(z_i, z_j). The patch-text denominator adds the K
    # text terms to it in log space.
    lse_zz = torch.logsumexp(s_zz, dim=1)                                          # (M,)
    lse_all = torch.logaddexp(lse_zz, torch.logsumexp(s_zt, dim=1))                # (M,)

    # Patch-text term, averaged within each class then summed over classes (absent classes add 0).
    l_t = lse_all - s_zt.gather(1, y[:, None]).squeeze(1)                           # (M,)
    onehot = F.one_hot(y, num_classes).to(z.dtype)                                  # (M, K)
    per_class_count = onehot.sum(0)                                                 # (K,)
    class_term = ((onehot.T @ l_t) / per_class_count.clamp(min=1.0)).sum()

    # Patch-patch term: the mean over positives of (-s(z_i, z_l) + lse_i) = lse_i - mean_pos s(z_i, z_l), with
    # Σ_{l≠i, y_l=y_i} z_i·z_l = z_i·(Σ_{y_l=y_i} z_l) - z_i·z_i from the (K, D) class sums: no (M, M) mask.
    class_sums = onehot.T @ z                                                       # (K, D)
    same_class = (z @ class_sums.T).gather(1, y[:, None]).squeeze(1)                # (M,) Σ_{y_l=y_i} z_i·z_l
    self_sim = torch.bmm(z[:, None, :], z[:, :, None]).reshape(-1)                  # (M,) z_i·z_i, = 1 ± rounding
    pos_sim = (same_class - self_sim) / temperature                                 # (M,)
    n_pos = per_class_count[y] - 1.0                                                # (M,)
    l_im = torch.where(n_pos > 0, lse_zz - pos_sim / n_pos.clamp(min=1.0), torch.zeros_like(lse_zz))

    return (class_term + l_im.sum()) / (m + num_classes)

"""Benchmark (not a test): the TSupCon loss as implemented (one logsumexp over the similarity matrix, diagonal
excluded in place, positives through per-class sums) against the previous implementation (explicit eye and
positive (M, M) masks, a masked copy of the matrix, the patch-text denominator as a logsumexp over the
concatenated (M, K + M) matrix), both copied below from the same formula.

For each M it prints, from interleaved runs (ABAB..., median of `--repeats`), the forward + backward time of
each and the ratio, and the peak extra memory of forward + backward: the most bytes held at once by tensors
created inside the loss and its backward (tracked per storage with a dispatch mode, so it works on CPU; the
inputs and the final gradient of z are not counted). Numbers on a shared machine are noisy; the ratio is the
figure to read.

    PYTHONPATH=. .venv/bin/python scripts/bench_tsupcon.py --m 1280 5120 --repeats 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import weakref

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode


def materialised_tsupcon(z, labels, text, tau):
    """The implementation before the lean rewrite (same formula, DESIGN §1)."""
    keep = labels >= 0
    z = F.normalize(z[keep].float(), dim=-1)
    y = labels[keep]
    m, k = z.shape[0], text.shape[0]
    t = F.normalize(text.float(), dim=-1)
    s_zt, s_zz = z @ t.T / tau, z @ z.T / tau
    eye = torch.eye(m, dtype=torch.bool, device=z.device)
    s_zz_off = s_zz.masked_fill(eye, -1.0e30)
    l_t = torch.logsumexp(torch.cat([s_zt, s_zz_off], dim=1), dim=1) - s_zt.gather(1, y[:, None]).squeeze(1)
    onehot = F.one_hot(y, k).float()
    class_term = ((onehot.T @ l_t) / onehot.sum(0).clamp(min=1.0)).sum()
    positive = (y[:, None] == y[None, :]) & ~eye
    n_pos = positive.sum(1)
    mean_pos = (s_zz * positive).sum(1) / n_pos.clamp(min=1)
    l_im = torch.where(n_pos > 0, torch.logsumexp(s_zz_off, dim=1) - mean_pos, torch.zeros_like(mean_pos))
    return (class_term + l_im.sum()) / (m + k)


class PeakMemory(TorchDispatchMode):
    """Peak bytes of the storages created by ops run under this mode that are alive at the same time."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.seen = set()

    def _track(self, t):
        if not isinstance(t, torch.Tensor):
            return
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self.seen or st.nbytes() == 0:
            return
        self.seen.add(key)
        nbytes = st.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)

        def release(key=key, nbytes=nbytes):
            self.live -= nbytes
            self.seen.discard(key)

        weakref.finalize(st, release)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            self._track(t)
        return out


def run(fn, z0, labels, text, tau):
    z = z0.clone().requires_grad_()
    fn(z, labels, text, tau).backward()
    return z.grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+", default=[1280, 5120],
                    help="patches per batch (5 images at 224 px: 1280, at 448 px: 5120)")
    ap.add_argument("--k", type=int, default=21)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from fmbseg.losses import tsupcon

    impls = {"lean": tsupcon, "materialised": materialised_tsupcon}
    for m in args.m:
        g = torch.Generator().manual_seed(m)
        z0 = torch.randn(m, args.d, generator=g)
        labels = torch.randint(-1, args.k, (m,), generator=g)
        text = torch.randn(args.k, args.d, generator=g)
        for fn in impls.values():
            run(fn, z0, labels, text, 0.1)                     # warm-up
        times = {name: [] for name in impls}
        for _ in range(args.repeats):
            for name, fn in impls.items():
                t0 = time.perf_counter()
                run(fn, z0, labels, text, 0.1)
                times[name].append(time.perf_counter() - t0)
        peaks = {}
        for name, fn in impls.items():
            z = z0.clone().requires_grad_()
            with PeakMemory() as pm:
                fn(z, labels, text, 0.1).backward()
            peaks[name] = pm.peak
        med = {name: statistics.median(v) for name, v in times.items()}
        lean, old = run(tsupcon, z0, labels, text, 0.1), run(materialised_tsupcon, z0, labels, text, 0.1)
        diff = ((lean - old).abs().max() / old.abs().max()).item()
        print(f"M={m} K={args.k} D={args.d}: fwd+bwd lean {med['lean'] * 1e3:.1f} ms, materialised "
              f"{med['materialised'] * 1e3:.1f} ms -> {med['materialised'] / med['lean']:.2f}x faster; peak extra "
              f"memory lean {peaks['lean'] / 2**20:.1f} MiB, materialised {peaks['materialised'] / 2**20:.1f} MiB "
              f"-> {100 * (1 - peaks['lean'] / peaks['materialised']):.0f}% less; max |grad diff| / max |grad| "
              f"{diff:.1e}", flush=True)


if __name__ == "__main__":
    main()

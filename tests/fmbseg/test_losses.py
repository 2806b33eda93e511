"""TSupCon against a plain loop over the DESIGN §1 formula, term by term."""

import math

import pytest
import torch

from fmbseg.losses import tsupcon


def reference_tsupcon(z, labels, text, tau):
    """Direct transcription of DESIGN §1 with Python loops and math.exp/log (float64)."""
    keep = [i for i in range(len(labels)) if labels[i] >= 0]
    zs = [torch.nn.functional.normalize(z[i].double(), dim=0) for i in keep]
    ys = [int(labels[i]) for i in keep]
    ts = [torch.nn.functional.normalize(t.double(), dim=0) for t in text]
    m, k = len(zs), len(ts)

    def s(a, b):
        return float(a @ b) / tau

    l_t = []
    for i in range(m):
        denom = sum(math.exp(s(zs[i], ts[c])) for c in range(k)) + sum(
            math.exp(s(zs[i], zs[j])) for j in range(m) if j != i)
        l_t.append(-s(zs[i], ts[ys[i]]) + math.log(denom))
    class_terms = 0.0
    for c in range(k):
        members = [l_t[i] for i in range(m) if ys[i] == c]
        class_terms += sum(members) / len(members) if members else 0.0
    im_terms = 0.0
    for i in range(m):
        pos = [l for l in range(m) if l != i and ys[l] == ys[i]]
        if not pos:
            continue
        lse = math.log(sum(math.exp(s(zs[i], zs[j])) for j in range(m) if j != i))
        im_terms += sum(-s(zs[i], zs[l]) + lse for l in pos) / len(pos)
    return (class_terms + im_terms) / (m + k)


@pytest.mark.parametrize("tau", [1.0, 0.1])
def test_matches_loop_reference_with_absent_singleton_and_ignored(tau):
    g = torch.Generator().manual_seed(0)
    k, d = 6, 8
    # class 0: 3 patches, class 2: singleton, class 4: 2 patches, classes 1, 3, 5 absent; three ignored patches
    labels = torch.tensor([0, 2, -1, 0, 4, 0, -1, 4, -5])
    z = torch.randn(len(labels), d, generator=g) * 3.0   # not normalised: the loss normalises
    text = torch.randn(k, d, generator=g)
    got = tsupcon(z, labels, text, temperature=tau)
    want = reference_tsupcon(z, labels, text, tau)
    print(f"tau={tau}: tsupcon={got.item():.6f} loop={want:.6f}")
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_default_temperature_is_one():
    g = torch.Generator().manual_seed(1)
    z, text = torch.randn(7, 5, generator=g), torch.randn(3, 5, generator=g)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    assert tsupcon(z, labels, text).item() == pytest.approx(reference_tsupcon(z, labels, text, 1.0), rel=1e-5)


def test_single_patch_and_all_ignored():
    g = torch.Generator().manual_seed(3)
    text = torch.randn(3, 4, generator=g)
    z = torch.randn(1, 4, generator=g).requires_grad_()
    one = tsupcon(z, torch.tensor([1]), text, 0.1)
    # no patch-patch pair: only l_t(0) = -s(z, t_1) + log Σ_k exp s(z, t_k), divided by M + K = 4
    assert one.item() == pytest.approx(reference_tsupcon(z.detach(), torch.tensor([1]), text, 0.1), rel=1e-4, abs=1e-6)
    one.backward()
    assert torch.isfinite(z.grad).all()
    none = tsupcon(z, torch.tensor([-1]), text)
    assert none.item() == 0.0 and none.requires_grad


def test_gradients_flow_and_are_finite_at_large_scale_logits():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2000, 16, generator=g, requires_grad=True)
    labels = torch.randint(-1, 5, (2000,), generator=g)
    text = torch.randn(5, 16, generator=g, requires_grad=True)
    loss = tsupcon(z, labels, text, temperature=0.01)   # logits up to ±100: naive exp would overflow float32
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert torch.isfinite(text.grad).all() and text.grad.abs().sum() > 0
    assert (z.grad[labels < 0] == 0).all()    # ignored patches take no part


def test_loss_decreases_when_patches_move_to_their_anchor():
    text = torch.eye(3, 4)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    aligned = text[labels] + 0.01
    shuffled = text[(labels + 1) % 3] + 0.01
    assert tsupcon(aligned, labels, text, 0.1) < tsupcon(shuffled, labels, text, 0.1)


def test_bad_labels_are_clear_errors():
    with pytest.raises(ValueError, match="labels must be < K"):
        tsupcon(torch.randn(2, 4), torch.tensor([0, 3]), torch.randn(3, 4))
    with pytest.raises(ValueError, match="dimension"):
        tsupcon(torch.randn(2, 4), torch.tensor([0, 1]), torch.randn(3, 5))


def materialised_tsupcon(z, labels, text, tau):
    """The previous implementation, kept as a reference: explicit eye and positive masks, the patch-text
    denominator as a logsumexp over the concatenated (M, K + M) matrix."""
    keep = labels >= 0
    z = torch.nn.functional.normalize(z[keep].float(), dim=-1)
    y = labels[keep]
    m, k = z.shape[0], text.shape[0]
    t = torch.nn.functional.normalize(text.float(), dim=-1)
    s_zt, s_zz = z @ t.T / tau, z @ z.T / tau
    eye = torch.eye(m, dtype=torch.bool)
    s_zz_off = s_zz.masked_fill(eye, -1.0e30)
    l_t = torch.logsumexp(torch.cat([s_zt, s_zz_off], dim=1), dim=1) - s_zt.gather(1, y[:, None]).squeeze(1)
    onehot = torch.nn.functional.one_hot(y, k).float()
    class_term = ((onehot.T @ l_t) / onehot.sum(0).clamp(min=1.0)).sum()
    positive = (y[:, None] == y[None, :]) & ~eye
    n_pos = positive.sum(1)
    mean_pos = (s_zz * positive).sum(1) / n_pos.clamp(min=1)
    l_im = torch.where(n_pos > 0, torch.logsumexp(s_zz_off, dim=1) - mean_pos, torch.zeros(m))
    return (class_term + l_im.sum()) / (m + k)


def differentiable_loop_tsupcon(z, labels, text, tau):
    """DESIGN §1 term by term like `reference_tsupcon`, but with float64 torch scalars so autograd gives the
    reference gradient."""
    keep = [i for i in range(len(labels)) if labels[i] >= 0]
    zs = [torch.nn.functional.normalize(z[i].double(), dim=0) for i in keep]
    ys = [int(labels[i]) for i in keep]
    ts = [torch.nn.functional.normalize(t.double(), dim=0) for t in text]
    m, k = len(zs), len(ts)
    total = torch.zeros((), dtype=torch.float64)
    for c in range(k):
        members = [i for i in range(m) if ys[i] == c]
        for i in members:
            terms = [zs[i] @ t / tau for t in ts] + [zs[i] @ zs[j] / tau for j in range(m) if j != i]
            total = total + (-(zs[i] @ ts[c]) / tau + torch.logsumexp(torch.stack(terms), 0)) / len(members)
    for i in range(m):
        pos = [l for l in range(m) if l != i and ys[l] == ys[i]]
        if pos:
            lse = torch.logsumexp(torch.stack([zs[i] @ zs[j] / tau for j in range(m) if j != i]), 0)
            total = total + sum(-(zs[i] @ zs[l]) / tau + lse for l in pos) / len(pos)
    return total / (m + k)


@pytest.mark.parametrize("tau", [1.0, 0.1])
def test_value_and_gradient_equal_the_loop_and_the_materialised_implementation(tau):
    g = torch.Generator().manual_seed(4)
    k, d = 5, 8
    labels = torch.tensor([0, 2, -1, 0, 4, 0, -1, 4, 2, 2, 1, -3])       # class 3 absent, class 1 a singleton
    z0 = torch.randn(len(labels), d, generator=g) * 2.0
    t0 = torch.randn(k, d, generator=g)
    got_z, got_t = z0.clone().requires_grad_(), t0.clone().requires_grad_()
    got = tsupcon(got_z, labels, got_t, temperature=tau)
    got.backward()
    for ref in (materialised_tsupcon, differentiable_loop_tsupcon):
        rz, rt = z0.clone().requires_grad_(), t0.clone().requires_grad_()
        want = ref(rz, labels, rt, tau)
        want.backward()
        assert abs(got.item() - want.item()) <= 1e-6 * max(1.0, abs(want.item())), ref.__name__
        assert torch.allclose(got_z.grad.double(), rz.grad.double(), rtol=1e-5, atol=1e-6), ref.__name__
        assert torch.allclose(got_t.grad.double(), rt.grad.double(), rtol=1e-5, atol=1e-6), ref.__name__
    assert (got_z.grad[labels < 0] == 0).all()


def test_equals_the_materialised_implementation_on_a_training_sized_batch():
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(-1, 12, (1280,), generator=g)              # 5 images x 16x16 patches
    z0, t0 = torch.randn(1280, 32, generator=g), torch.randn(12, 32, generator=g)
    z1, z2 = z0.clone().requires_grad_(), z0.clone().requires_grad_()
    a, b = tsupcon(z1, labels, t0, 0.1), materialised_tsupcon(z2, labels, t0, 0.1)
    a.backward()
    b.backward()
    assert abs(a.item() - b.item()) <= 1e-6 * abs(b.item())
    assert (z1.grad - z2.grad).abs().max() <= 1e-6 * z2.grad.abs().max()

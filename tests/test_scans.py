"""The parallel scans used for training-length sequences equal the sequential recurrences."""
import pytest
import torch

from components.model import scan


def _m1_inputs(b=2, L=77, d=24, n=4, G=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return dict(u=r(b, L, d), dt=torch.rand(b, L, d, generator=g) * 0.5, A=-torch.rand(d, n, generator=g) * 3,
                B=r(b, L, G, n), C=r(b, L, G, n), D=r(d), resets=torch.rand(b, L, generator=g) < 0.1,
                h0=r(b, d, n))


@pytest.mark.parametrize("L,chunk", [(1, 16), (77, 16), (64, 64), (130, 256)])
@pytest.mark.parametrize("with_resets", [False, True])
def test_selective_scan_equals_recurrence(L, chunk, with_resets):
    x = _m1_inputs(L=L)
    if not with_resets:
        x["resets"] = None
    y_ref, h_ref = scan.selective_scan_ref(**x)
    y, h = scan.selective_scan(**x, chunk=chunk)
    assert (y - y_ref).abs().max() < 1e-5
    assert (h - h_ref).abs().max() < 1e-5


@pytest.mark.parametrize("L,G", [(1, 6), (77, 6), (40, 1), (40, 24)])
@pytest.mark.parametrize("with_resets", [False, True])
def test_step_by_step_scan_equals_recurrence(L, G, with_resets):
    """The CPU inference scan (in-place, one step at a time): groups, resets and an initial state as the reference."""
    x = _m1_inputs(L=L, G=G)
    if not with_resets:
        x["resets"] = None
    y_ref, h_ref = scan.selective_scan_ref(**x)
    y, h = scan.selective_scan_steps(**x)
    assert (y - y_ref).abs().max() < 1e-5
    assert (h - h_ref).abs().max() < 1e-5
    assert torch.isfinite(scan.selective_scan_steps(**{**x, "dt": x["dt"] * 200})[0]).all()


def test_selective_scan_is_stable_for_large_steps():
    x = _m1_inputs(L=200)
    x["dt"] = x["dt"] * 200  # decays of exp(-300) per step: a cumulative-sum formulation would overflow
    y_ref, _ = scan.selective_scan_ref(**x)
    y, _ = scan.selective_scan(**x)
    assert torch.isfinite(y).all() and (y - y_ref).abs().max() < 1e-4


def test_selective_state_step_equals_scan():
    x = _m1_inputs(L=5)
    x["resets"] = None
    y_ref, h_ref = scan.selective_scan_ref(**x)
    h = x["h0"].clone()
    ys = [scan.selective_state_step(h, x["u"][:, t], x["dt"][:, t], x["A"], x["B"][:, t], x["C"][:, t], x["D"])
          for t in range(5)]
    assert (torch.stack(ys, 1) - y_ref).abs().max() < 1e-5
    assert (h - h_ref).abs().max() < 1e-5


def _ssd_inputs(b=2, L=77, nh=6, p=8, g=3, n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)
    return dict(x=r(b, L, nh, p), dt=torch.rand(b, L, nh, generator=gen), A=-torch.rand(nh, generator=gen) * 2,
                B=r(b, L, g, n), C=r(b, L, g, n), D=r(nh), resets=torch.rand(b, L, generator=gen) < 0.1,
                h0=r(b, nh, p, n))


@pytest.mark.parametrize("L,chunk", [(1, 16), (77, 16), (64, 64), (100, 32)])
@pytest.mark.parametrize("with_resets", [False, True])
def test_ssd_chunked_equals_recurrence(L, chunk, with_resets):
    x = _ssd_inputs(L=L)
    if not with_resets:
        x["resets"] = None
    y_ref, s_ref = scan.ssd_ref(**x)
    y, s = scan.ssd_chunked(**x, chunk=chunk)
    assert (y - y_ref).abs().max() < 1e-4
    assert (s - s_ref).abs().max() < 1e-4


def test_ssd_step_equals_recurrence():
    x = _ssd_inputs(L=4)
    x["resets"] = None
    y_ref, s_ref = scan.ssd_ref(**x)
    s = x["h0"].clone()
    ys = [scan.ssd_step(s, x["x"][:, t], x["dt"][:, t], x["A"], x["B"][:, t], x["C"][:, t], x["D"]) for t in range(4)]
    assert (torch.stack(ys, 1) - y_ref).abs().max() < 1e-5
    assert (s - s_ref).abs().max() < 1e-5


def test_ssd_gradients_are_finite_across_resets():
    x = _ssd_inputs(L=40)
    for k in ("x", "dt", "B", "C"):
        x[k].requires_grad_(True)
    y, _ = scan.ssd_chunked(**x, chunk=16)
    y.square().sum().backward()
    for k in ("x", "dt", "B", "C"):
        assert torch.isfinite(x[k].grad).all(), k


def test_scan_by_document_equals_scan_with_resets():
    """The route packed rows take to a reset-less fused kernel (one zero-state row per document) gives the
    reset scan's outputs and each row's final state, gradients included."""
    from components.model.kernels import scan_by_document

    x = _m1_inputs(b=3, L=40)
    u, dt, A, B, C, D = (x[k] for k in ("u", "dt", "A", "B", "C", "D"))
    resets = torch.zeros(3, 40, dtype=torch.bool)
    resets[0, [7, 8, 30]] = True  # a one-token document too
    resets[2, 21] = True          # row 1 is a single document
    u.requires_grad_(True)
    y_ref, h_ref = scan.selective_scan_ref(u, dt, A, B, C, D, resets)
    y, h = scan_by_document(lambda *a: scan.selective_scan_ref(*a), u, dt, A, B, C, D, resets)
    assert (y - y_ref).abs().max() < 1e-5 and (h - h_ref).abs().max() < 1e-5
    g_ref, = torch.autograd.grad(y_ref.sum(), u)
    g, = torch.autograd.grad(y.sum(), u)
    assert (g - g_ref).abs().max() < 1e-5
    assert scan_by_document(lambda *a: None, u, dt, A, B, C, D, resets, max_blowup=1.0) is None

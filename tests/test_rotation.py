"""core.rotation: the randomized Hadamard transform against dense references, and the statistics it rotates."""

import math

import pytest
import scipy.linalg
import torch

from lqkit.core import rotation as rt
from lqkit.core.rotation import Rotation
from lqkit.errors import SpecError


def dense(rot: Rotation, n: int) -> torch.Tensor:
    """R (n, n) in float64: blockdiag of H_b/√b (scipy's Sylvester Hadamard) times diag(s)."""
    hb = torch.tensor(scipy.linalg.hadamard(rot.block), dtype=torch.float64) / math.sqrt(rot.block)
    return torch.block_diag(*[hb] * (n // rot.block)) @ torch.diag(rt.signs(rot, n).double())


def blockwise(x: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """R·x by the Kronecker form I_{n/b} ⊗ (H_b/√b) after the signs, one dense H_b (large n)."""
    n, b = x.shape[-1], rot.block
    hb = torch.tensor(scipy.linalg.hadamard(b), dtype=torch.float64) / math.sqrt(b)
    xs = x.double() * rt.signs(rot, n).double()
    return (xs.reshape(*x.shape[:-1], n // b, b) @ hb.T).reshape(x.shape)


@pytest.mark.parametrize("n", [1, 2, 8, 12, 96, 160, 640, 1152])
def test_matches_dense_and_is_orthogonal(n):
    rot = Rotation.for_size(n, seed=7)
    r = dense(rot, n)
    torch.testing.assert_close(r @ r.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    eye = torch.eye(n)
    torch.testing.assert_close(rt.rotate_input(eye, rot).double(), r.T, rtol=0, atol=1e-6)  # rows: R·e_i
    x = torch.randn(2, 3, n, dtype=torch.float64)
    torch.testing.assert_close(rt.rotate_input(x, rot), x @ r.T, rtol=0, atol=1e-6)
    torch.testing.assert_close(rt.rotate_input(x, rot, inverse=True), x @ r, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n,block", [(2048, 2048), (5632, 512), (11008, 256), (4096 * 3, 4096), (640, 32)])
def test_large_and_non_power_of_two_sizes(n, block):
    rot = Rotation(123, block) if block != rt.default_block(n) else Rotation.for_size(n, seed=123)
    assert rot.block == block
    x = torch.randn(3, n, dtype=torch.float64)
    y = rt.rotate_input(x, rot)
    torch.testing.assert_close(y, blockwise(x, rot), rtol=0, atol=1e-6)
    torch.testing.assert_close(rt.rotate_input(y, rot, inverse=True), x, rtol=0, atol=1e-6)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


def test_block_sizes_and_stages():
    assert [rt.default_block(n) for n in (640, 1152, 2048, 5632, 11008, 7)] == [128, 128, 2048, 512, 256, 1]
    assert rt.MAX_BLOCK == 2048  # larger powers of two are rotated in blocks of 2048 by default
    assert [rt.default_block(n) for n in (4096, 14336, 1 << 16)] == [2048, 2048, 2048]
    assert Rotation.for_size(4096).block == 2048 and Rotation(0, 4096).block == 4096  # still allowed
    assert rt.radices(2048) == (64, 32) and rt.radices(64) == (64,) and rt.radices(1) == ()
    assert rt.radices(1 << 13) == (32, 16, 16) and rt.radices(16, radix=2) == (2, 2, 2, 2)
    with pytest.raises(SpecError, match="does not divide"):
        rt.rotate_input(torch.zeros(4, 96), Rotation(0, 64))
    with pytest.raises(SpecError, match="power of two"):
        Rotation(0, 48)


def test_butterfly_radix_and_more_stages_agree():
    """Radix 2 is the plain log2(b)-stage butterfly; three and more stages take the general axis path."""
    rot = Rotation(1, 1 << 12)  # one block of 4096 (two stages of 64 at the default radix)
    x = torch.randn(5, 1 << 12)
    ref = rt.rotate_input(x, rot)
    for radix in (2, 4, 16):
        torch.testing.assert_close(rt.transform(rot, 1 << 12, radix=radix)(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs_keep_their_dtype(dtype):
    rot = Rotation.for_size(640, seed=2)
    x = torch.randn(4, 640)
    y = rt.rotate_input(x.to(dtype), rot)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), rt.rotate_input(x.to(dtype).float(), rot).to(dtype).float())


def test_seeds_are_deterministic_and_serialised():
    assert rt.seed_for("model.layers.0.self_attn|640") == rt.seed_for("model.layers.0.self_attn|640") == 1843263647
    a, b = rt.for_matrix("model.layers.0.self_attn.q_proj", 640), rt.for_matrix("model.layers.0.self_attn.k_proj", 640)
    assert a == b and a.block == 128  # siblings reading one input share their rotation
    assert rt.for_matrix("model.layers.1.self_attn.q_proj", 640) != a
    assert rt.for_matrix("model.layers.0.self_attn.o_proj", 1024).seed != a.seed
    assert torch.equal(rt.signs(a, 640), rt.signs(Rotation(a.seed, 128), 640))
    assert not torch.equal(rt.signs(a, 640), rt.signs(Rotation(a.seed + 1, 128), 640))
    assert rt.signs(Rotation(5, 8), 8).tolist() == torch.randint(
        0, 2, (8,), generator=torch.Generator().manual_seed(5)).mul(2).sub(1).float().tolist()
    assert Rotation.from_dict(a.to_dict()) == a


def test_weight_and_gram_rotate_consistently():
    g = torch.Generator().manual_seed(0)
    rot = Rotation.for_size(96, seed=4)
    w, x = torch.randn(20, 96, generator=g), torch.randn(50, 96, generator=g) * torch.rand(96, generator=g)
    wr = rt.rotate_weight(w, rot)
    torch.testing.assert_close(rt.rotate_input(x, rot) @ wr.T, x @ w.T, rtol=1e-4, atol=1e-4)  # W·x = W'·(R·x)
    torch.testing.assert_close(rt.unrotate_weight(wr, rot), w, rtol=1e-5, atol=1e-5)
    h = x.T @ x / 50
    xr = rt.rotate_input(x, rot)
    torch.testing.assert_close(rt.rotate_gram(h, rot), xr.T @ xr / 50, rtol=1e-4, atol=1e-5)  # the moment of R·x
    e = torch.randn(20, 96, generator=g)
    er, hr = rt.rotate_weight(e, rot), rt.rotate_gram(h, rot)
    torch.testing.assert_close(((er @ hr) * er).sum(1), ((e @ h) * e).sum(1), rtol=1e-4, atol=1e-4)  # (E·H·Eᵀ)_ii


def test_fisher_estimate_keeps_row_sums_and_is_exact_for_kfac_fisher():
    g = torch.Generator().manual_seed(1)
    rot = Rotation.for_size(160, seed=5)  # blocks of 32
    mix = torch.randn(160, 160, generator=g) * 0.2 + torch.eye(160)
    x = torch.randn(400, 160, generator=g) @ mix * torch.rand(160, generator=g) * 3
    h = x.T @ x / 400
    rho = torch.rand(12, generator=g)
    kfac = rho[:, None] * torch.diagonal(h)[None, :]  # F_ij = ρ_i·H_jj
    torch.testing.assert_close(rt.rotate_fisher(kfac, rot, h), rho[:, None] * torch.diagonal(rt.rotate_gram(h, rot)),
                               rtol=1e-4, atol=1e-6)
    f = torch.rand(12, 160, generator=g)
    for hh in (None, h):
        fr = rt.rotate_fisher(f, rot, hh)
        torch.testing.assert_close(fr.sum(1), f.sum(1), rtol=1e-5, atol=1e-5)  # rows: exact
        rows, cols = rt.rotate_fisher_sums((f.sum(1), f.sum(0)), rot, hh)
        torch.testing.assert_close(rows, fr.sum(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cols, fr.sum(0), rtol=1e-5, atol=1e-5)


def test_fisher_estimate_close_to_the_true_rotated_fisher():
    """Per-window gradients G = Δ·Xᵀ of a layer with correlated inputs: the rotated diagonal estimated from
    F and H is close to the diagonal of the rotated gradients, and closer than the block mean alone."""
    g = torch.Generator().manual_seed(2)
    n, out, windows, tokens = 128, 16, 300, 8
    rot = Rotation(9, 32)
    mix = torch.randn(n, n, generator=g) * 0.3 + torch.eye(n)
    scale = torch.rand(n, generator=g) * 3
    xs = torch.randn(windows, tokens, n, generator=g) @ mix * scale  # (W, T, n)
    ds = torch.randn(windows, tokens, out, generator=g) * torch.rand(out, generator=g)  # (W, T, out)
    grads = ds.transpose(1, 2) @ xs  # (W, out, n)
    f = grads.square().mean(0)
    true = rt.rotate_weight(grads, rot).square().mean(0)  # gradient of W' = G·Rᵀ
    h = (xs.reshape(-1, n).T @ xs.reshape(-1, n)) / (windows * tokens)
    est, naive = rt.rotate_fisher(f, rot, h), rt.rotate_fisher(f, rot)
    rel = lambda a: float((a - true).norm() / true.norm())  # noqa: E731
    assert rel(est) < 0.15 and rel(est) < rel(naive)

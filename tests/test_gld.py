"""Graph-on-Logits Distillation: the closed form against exact Gromov-Wasserstein.

Exact GW here is (a) brute force over permutations for n <= 7 nodes — for the
square loss and positive semidefinite graphs (every co-activation graph is one)
the GW objective is concave in the coupling, so a permutation is optimal and the
brute force *is* the exact coupling GW — and (b) POT's ``ot.gromov`` solver, which
may stop in a local minimum and so can only be above the exact value.
"""
from __future__ import annotations


import pytest
import torch

from surgeon.fusion import TopK, gld_loss, sorted_gw
from surgeon.fusion.gld import (co_activation_graph, graph_features, gw_bruteforce, gw_cost, node_features,
                                sorted_distance, topk_values)

ot = pytest.importorskip("ot")


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the probability / vocabulary-node form of the loss (the paper's default form uses top-k logits on k rank nodes)
PROBS = {"values": "probs", "normalize": "none", "nodes": "vocab", "scale": "sum"}


def psd_graph(n: int, t: int, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    z = torch.rand(t, n, generator=gen, dtype=torch.float64) * scale
    return z.T @ z / t


def relabel(g: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return g[perm][:, perm]


def pot_gw(c: torch.Tensor, d: torch.Tensor) -> float:
    n, m = c.shape[0], d.shape[0]
    p = torch.full((n,), 1.0 / n, dtype=torch.float64).numpy()
    q = torch.full((m,), 1.0 / m, dtype=torch.float64).numpy()
    return float(ot.gromov.gromov_wasserstein2(c.numpy(), d.numpy(), p, q, loss_fun="square_loss"))


# ----------------------------------------------------------------------------- zero cases
def test_identical_graphs_give_zero():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 9, 50, generator=gen, dtype=torch.float64)
    assert gld_loss(x, x, top_k=8).item() == 0.0
    c = psd_graph(6, 4, gen)
    for feature in ("degree", "self", "l2"):
        assert sorted_gw(c, c, feature, 1).item() == 0.0


@pytest.mark.parametrize("nodes", ["vocab", "rank"])
@pytest.mark.parametrize("feature", ["degree", "self", "l2"])
def test_relabelled_vocabulary_gives_zero(nodes, feature):
    # the teacher is the student with its vocabulary permuted: same graph up to relabelling
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 40, generator=gen, dtype=torch.float64)
    perm = torch.randperm(40, generator=gen)
    loss = gld_loss(x, x[..., perm], top_k=6, nodes=nodes, feature=feature)
    assert abs(loss.item()) < 1e-12


def test_relabelled_graph_gives_zero_and_exact_gw_zero():
    gen = torch.Generator().manual_seed(2)
    c = psd_graph(6, 3, gen)
    d = relabel(c, torch.randperm(6, generator=gen))
    assert sorted_gw(c, d, "degree", 2).item() < 1e-15
    exact, _ = gw_bruteforce(c, d, 2)
    assert exact < 1e-15


def test_vocabulary_padding_isolated_nodes():
    # a larger vocabulary whose extra entries are never in the top-k changes nothing
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 30, generator=gen, dtype=torch.float64)
    big = torch.cat([x, torch.full((2, 5, 20), -1e4, dtype=torch.float64)], dim=-1)
    assert gld_loss(x, big, top_k=5, values="logits").item() < 1e-12
    assert gld_loss(x, big[..., torch.randperm(50, generator=gen)], top_k=5).item() < 1e-9


# ----------------------------------------------------------------------------- exact cases
def test_rank_one_dominated_graphs_are_exact_for_p1():
    """C = a a^T, D = b b^T with sorted(a) >= sorted(b) entrywise (a, b >= 0).

    With the sorted matching s, C_ik - D_s(i)s(k) = a_i a_k - b_s(i) b_s(k) >= 0
    for every k, so no row's differences cancel: the permutation s costs
    (1/n^2) sum_ik |C_ik - D_s(i)s(k)| = (1/n) sum_i |fbar_C(i) - fbar_D(s(i))| =
    GW~_1, while GW~_1 is a lower bound of GW_1. Hence GW~_1 = GW_1 exactly.
    """
    gen = torch.Generator().manual_seed(4)
    for trial in range(20):
        n = 6
        a = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
        shrink = torch.rand(n, generator=gen, dtype=torch.float64)
        b = torch.sort(a, descending=True).values * torch.sort(shrink, descending=True).values
        b = b[torch.randperm(n, generator=gen)]
        c, d = torch.outer(a, a), torch.outer(b, b)
        exact, _ = gw_bruteforce(c, d, 1)
        closed = sorted_gw(c, d, "degree", 1).item()
        assert closed == pytest.approx(exact, rel=1e-12, abs=1e-15)
        # and the loss itself, on one-position "sequences" whose top-k probabilities are a and b
        assert closed * n * n == pytest.approx(sorted_distance(c.sum(-1), d.sum(-1), 1).item(), rel=1e-12)


def test_rank_one_proportional_graphs_are_exact_for_l2_p2():
    gen = torch.Generator().manual_seed(5)
    n = 6
    a = torch.rand(n, generator=gen, dtype=torch.float64)
    c = torch.outer(a, a)
    for s2 in (0.2, 0.7, 1.6):
        d = s2 * relabel(c, torch.randperm(n, generator=gen))
        expected = (1 - s2) ** 2 * a.norm().item() ** 4 / n**2
        exact, _ = gw_bruteforce(c, d, 2)
        assert exact == pytest.approx(expected, rel=1e-10)
        assert sorted_gw(c, d, "l2", 2).item() == pytest.approx(expected, rel=1e-10)
        assert pot_gw(c, d) == pytest.approx(expected, rel=1e-6)


def test_constant_shift_is_exact_for_degree_p2():
    gen = torch.Generator().manual_seed(6)
    c = psd_graph(6, 3, gen)
    for shift in (0.05, 0.3):
        d = relabel(c, torch.randperm(6, generator=gen)) + shift  # still PSD (+ c 11^T)
        exact, _ = gw_bruteforce(c, d, 2)
        assert exact == pytest.approx(shift**2, rel=1e-10)
        assert sorted_gw(c, d, "degree", 2).item() == pytest.approx(shift**2, rel=1e-10)
        assert pot_gw(c, d) == pytest.approx(shift**2, rel=1e-6)


# ----------------------------------------------------------------------------- the bound
def test_closed_form_never_above_exact_gw():
    """GW~_p <= GW_p (degree, p = 1, 2; l2, p = 2), over random PSD co-activation graphs,
    including graphs built from the top-k probabilities of random logits."""
    gen = torch.Generator().manual_seed(7)
    checked = 0
    for trial in range(60):
        n = 5 if trial % 2 else 6
        c = psd_graph(n, 1 + trial % 4, gen)
        d = psd_graph(n, 2 + trial % 3, gen, scale=0.5 + (trial % 5) / 2)
        ex1, _ = gw_bruteforce(c, d, 1)
        ex2, _ = gw_bruteforce(c, d, 2)
        pot = pot_gw(c, d)
        assert pot >= ex2 - 1e-12, "POT went below the brute-force optimum"
        assert sorted_gw(c, d, "degree", 1).item() <= ex1 + 1e-12
        assert sorted_gw(c, d, "degree", 2).item() <= ex2 + 1e-12
        assert sorted_gw(c, d, "l2", 2).item() <= ex2 + 1e-12
        checked += 1
    # graphs from actual logits (rank nodes: k = 6 nodes)
    for trial in range(20):
        zs = torch.randn(1, 5, 30, generator=gen, dtype=torch.float64)
        zt = torch.randn(1, 8, 25, generator=gen, dtype=torch.float64) * 2
        vs, ids_s, _ = topk_values(zs, 6)
        vt, ids_t, _ = topk_values(zt, 6)
        c = co_activation_graph(vs, nodes="rank")[0]
        d = co_activation_graph(vt, nodes="rank")[0]
        ex2, _ = gw_bruteforce(c, d, 2)
        assert sorted_gw(c, d, "degree", 2).item() <= ex2 + 1e-15
        assert pot_gw(c, d) >= ex2 - 1e-12
        checked += 1
    assert checked == 80


def test_bruteforce_equals_coupling_gw_for_psd_graphs():
    # the brute force is exact coupling GW: no coupling POT finds is better, and the
    # permutation's coupling evaluates to the same cost with gw_cost
    gen = torch.Generator().manual_seed(8)
    c, d = psd_graph(5, 2, gen), psd_graph(5, 3, gen)
    exact, perm = gw_bruteforce(c, d, 2)
    plan = torch.zeros(5, 5, dtype=torch.float64)
    plan[torch.arange(5), torch.tensor(perm)] = 1 / 5
    assert gw_cost(c, d, plan, 2).item() == pytest.approx(exact, rel=1e-12)
    # POT from many random starting couplings never beats it
    u = torch.full((5,), 0.2, dtype=torch.float64).numpy()
    for _ in range(5):
        g0 = ot.sinkhorn(u, u, torch.rand(5, 5, generator=gen, dtype=torch.float64).numpy(), 0.5)
        val = ot.gromov.gromov_wasserstein2(c.numpy(), d.numpy(), u, u, G0=g0)
        assert float(val) >= exact - 1e-12


# ----------------------------------------------------------------------------- the loss
def test_features_match_dense_graph():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 6, 25, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    for values in ("probs", "logprobs", "logits"):
        z, ids, v = topk_values(x, 5, values=values)
        for nodes in ("vocab", "rank"):
            g = co_activation_graph(z, ids, v, mask, nodes=nodes)
            for feature in ("degree", "self", "l2"):
                f1 = graph_features(z, ids, v, mask, nodes=nodes, feature=feature)
                f2 = node_features(g, feature)
                torch.testing.assert_close(f1, f2, rtol=1e-10, atol=1e-12)


def test_loss_is_the_paper_formula_on_dense_graphs():
    # sum_i |deg_C(i)v - deg_D(i)v| with deg = row sums of the mean co-activation graph
    gen = torch.Generator().manual_seed(10)
    xs = torch.randn(1, 7, 30, generator=gen, dtype=torch.float64)
    xt = torch.randn(1, 9, 40, generator=gen, dtype=torch.float64)
    zs, ids_s, _ = topk_values(xs, 4, values="probs", normalize="none")
    zt, ids_t, _ = topk_values(xt, 4, values="probs", normalize="none")
    c = co_activation_graph(zs, ids_s, 30)[0]
    d = co_activation_graph(zt, ids_t, 40)[0]
    d_pad = torch.sort(d.sum(-1), descending=True).values
    c_pad = torch.nn.functional.pad(torch.sort(c.sum(-1), descending=True).values, (0, 10))
    expected = (c_pad - d_pad).abs().sum()
    assert gld_loss(xs, xt, top_k=4, **PROBS).item() == pytest.approx(expected.item(), rel=1e-12)
    # and n^2 * GW~_1 of the padded graphs
    assert gld_loss(xs, xt, top_k=4, **PROBS).item() == pytest.approx(40**2 * sorted_gw(c, d, "degree", 1).item(),
                                                                      rel=1e-10)


def test_topk_cache_matches_full_logits():
    gen = torch.Generator().manual_seed(11)
    xs = torch.randn(2, 6, 30, generator=gen)
    xt = torch.randn(2, 8, 45, generator=gen)
    full = gld_loss(xs, xt, top_k=5)
    cached = gld_loss(xs, TopK.from_logits(xt, 5), top_k=5)
    assert cached.item() == pytest.approx(full.item(), rel=1e-5)


def test_masks_and_batching():
    gen = torch.Generator().manual_seed(12)
    xs = torch.randn(3, 6, 20, generator=gen, dtype=torch.float64)
    xt = torch.randn(3, 9, 25, generator=gen, dtype=torch.float64)
    ms = torch.ones(3, 6, dtype=torch.bool)
    ms[1, 4:] = False
    mt = torch.ones(3, 9, dtype=torch.bool)
    mt[2, :3] = False
    per = gld_loss(xs, xt, top_k=4, student_mask=ms, teacher_mask=mt, reduction="none")
    assert per.shape == (3,)
    for b in range(3):
        one = gld_loss(xs[b:b + 1, ms[b]], xt[b:b + 1, mt[b]], top_k=4)
        assert per[b].item() == pytest.approx(one.item(), rel=1e-12)
    assert gld_loss(xs, xt, top_k=4, student_mask=ms, teacher_mask=mt).item() == pytest.approx(per.mean().item())


def test_probability_loss_is_bounded_by_two():
    gen = torch.Generator().manual_seed(13)
    for _ in range(10):
        xs = torch.randn(2, 10, 64, generator=gen) * 5
        xt = torch.randn(2, 12, 50, generator=gen) * 5
        val = gld_loss(xs, xt, top_k=16, **PROBS).item()
        assert 0.0 <= val <= 2.0


def test_options_are_validated():
    x = torch.randn(1, 3, 10)
    with pytest.raises(ValueError, match="standardize"):
        gld_loss(x, x, top_k=3, normalize="standardize")
    with pytest.raises(ValueError, match="nodes"):
        gld_loss(x, x, top_k=3, nodes="tokens")
    with pytest.raises(ValueError, match="top_k"):
        gld_loss(x, x, top_k=0)
    # standardize is fine with the other features
    assert gld_loss(x, x * 2, top_k=3, values="logits", normalize="standardize", feature="l2").item() >= 0


@pytest.mark.parametrize("kw", [
    {},
    {"feature": "l2"},
    {"feature": "self", "nodes": "rank"},
    {"values": "logits", "normalize": "minmax", "p": 2},
    {"values": "logprobs", "aggregate": "sum", "node_reduction": "mean"},
    {"normalize": "sum", "temperature": 2.0},
])
def test_gradcheck(kw):
    gen = torch.Generator().manual_seed(14)
    xs = torch.randn(2, 5, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    xt = torch.randn(2, 7, 9, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: gld_loss(a, xt, top_k=4, **kw), (xs,), eps=1e-6, atol=1e-7)


def test_device_and_dtype_follow_the_student():
    xs = torch.randn(1, 4, 10, dtype=torch.float32, requires_grad=True)
    xt = torch.randn(1, 4, 10, dtype=torch.float64)
    loss = gld_loss(xs, xt, top_k=3)
    assert loss.dtype == torch.float32 and loss.device == xs.device
    loss.backward()
    assert xs.grad is not None and torch.isfinite(xs.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(15)
    xs = torch.randn(2, 6, 40, generator=gen, dtype=torch.float64)
    xt = torch.randn(2, 7, 30, generator=gen, dtype=torch.float64)
    for kw in ({}, {"feature": "l2"}, {"nodes": "rank"}):
        cpu = gld_loss(xs, xt, top_k=5, **kw)
        gpu = gld_loss(xs.cuda(), xt.cuda(), top_k=5, **kw)
        assert gpu.item() == pytest.approx(cpu.item(), rel=1e-9)


def test_gld_rewards_confidence_whatever_the_tokens():
    """Why GLD can hurt perplexity (docs/fusion.md, "What GLD does on the pico zoo"): the
    sorted comparison is blind to token identity, so a student flatter than its teacher is
    pushed to sharpen on its *own* favourite token, even when the teacher favours another.
    The token-wise KL moves mass to the teacher's token instead."""
    from surgeon.fusion.tokenwise import kl_loss

    gen = torch.Generator().manual_seed(16)
    xs = torch.randn(1, 6, 20, generator=gen, dtype=torch.float64) * 0.3
    xs[..., 3] += 1.0                      # the student mildly prefers token 3
    xt = torch.randn(1, 6, 20, generator=gen, dtype=torch.float64) * 0.3
    xt[..., 7] += 4.0                      # the teacher is confident about token 7
    p0 = xs.softmax(-1)

    def step(loss_fn):
        x = xs.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(x), x)
        return (x - 0.5 * g / g.norm()).detach().softmax(-1)

    p_gld = step(lambda x: gld_loss(x, xt, top_k=4, **PROBS))
    gain3, gain7 = (p_gld[..., 3] - p0[..., 3]).mean(), (p_gld[..., 7] - p0[..., 7]).mean()
    assert (p_gld[..., 3] > p0[..., 3]).all()           # sharper on the student's own token
    assert gain3 > 5 * gain7.abs()                      # hardly moved on the teacher's
    assert p_gld.max(-1).values.mean() > p0.max(-1).values.mean()
    tk = TopK.from_logits(xt, 4)
    probs = (tk.logits - tk.lse.unsqueeze(-1)).exp()
    p_kl = step(lambda x: kl_loss(x.reshape(-1, 20), probs.reshape(-1, 4), target_ids=tk.ids.reshape(-1, 4),
                                  sparse="fusellm"))
    assert (p_kl[..., 7] > p0[..., 7]).all()
    assert (p_kl[..., 7] - p0[..., 7]).mean() > 5 * (p_kl[..., 3] - p0[..., 3]).mean().clamp_min(0)


def test_gld_tempers_an_overconfident_student():
    """The other side of the same coin: a student more confident than its teacher (as after
    several epochs on a small dataset) is flattened by GLD, which regularises it."""
    gen = torch.Generator().manual_seed(17)
    xs = torch.randn(1, 6, 20, generator=gen, dtype=torch.float64) * 0.3
    xs[..., 3] += 6.0                      # the student is nearly certain of token 3
    xt = torch.randn(1, 6, 20, generator=gen, dtype=torch.float64) * 0.3
    xt[..., 7] += 1.5                      # the teacher is much less sure of token 7
    x = xs.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(gld_loss(x, xt, top_k=4, **PROBS), x)
    p0, p1 = xs.softmax(-1), (xs - 0.5 * g / g.norm()).softmax(-1)
    assert (p1[..., 3] < p0[..., 3]).all()
    assert (p1.max(-1).values < p0.max(-1).values).all()


# ----------------------------------------------------------------------------- temperature and caches
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("kw", [
    {},                                                            # the defaults: top-k logits, minmax, rank nodes
    PROBS,
    {"values": "probs", "nodes": "rank"},
    {"values": "logprobs", "normalize": "sum"},
    {"values": "probs", "normalize": "l2", "feature": "l2"},
])
def test_identical_models_give_zero_at_every_temperature_full_and_cached(temperature, kw):
    # issue 17: a cached teacher's top-k at T != 1 used to be renormalised over k while the
    # student's was not (V=4000, k=16, T=2 gave 0.985); now both sides make the same choice
    gen = torch.Generator().manual_seed(20)
    x = torch.randn(2, 9, 4000, generator=gen, dtype=torch.float64) * 3
    teachers = {"full": x, "cache at T=1": TopK.from_logits(x, 16),
                "cache at T": TopK.from_logits(x, 16, temperature=temperature),
                "cache without lse": TopK(*TopK.from_logits(x, 16).__dict__.values())}
    teachers["cache without lse"] = TopK(teachers["cache at T=1"].logits, teachers["cache at T=1"].ids, None, 4000)
    for name, t in teachers.items():
        val = gld_loss(x, t, top_k=16, temperature=temperature, **kw).item()
        assert val == pytest.approx(0.0, abs=1e-9), (name, val)
    # and the cached teacher at its own temperature is exactly the full one for a different student
    y = torch.randn(2, 7, 3000, generator=gen, dtype=torch.float64)
    full = gld_loss(y, x, top_k=16, temperature=temperature, **kw).item()
    cached = gld_loss(y, teachers["cache at T"], top_k=16, temperature=temperature, **kw).item()
    assert cached == pytest.approx(full, rel=1e-9, abs=1e-12)


def test_temperature_changes_the_probability_loss_and_a_foreign_cache_is_renormalised():
    gen = torch.Generator().manual_seed(21)
    xs = torch.randn(1, 8, 300, generator=gen, dtype=torch.float64) * 2
    xt = torch.randn(1, 8, 200, generator=gen, dtype=torch.float64) * 2
    kw = dict(top_k=8, **PROBS)
    assert gld_loss(xs, xt, temperature=2.0, **kw).item() != pytest.approx(gld_loss(xs, xt, **kw).item(), rel=1e-3)
    # cache at T=1 used at T=2: both sides renormalised over their top-8 at T=2
    zs, ids_s, _ = topk_values(xs, 8, values="probs", normalize="none", temperature=2.0, renormalize=True)
    zt, ids_t, _ = topk_values(xt, 8, values="probs", normalize="none", temperature=2.0, renormalize=True)
    torch.testing.assert_close(zs.sum(-1), torch.ones(1, 8, dtype=torch.float64))
    c = co_activation_graph(zs, ids_s, 300)[0]
    d = co_activation_graph(zt, ids_t, 200)[0]
    expected = 300**2 * sorted_gw(c, d, "degree", 1).item()
    got = gld_loss(xs, TopK.from_logits(xt, 8), temperature=2.0, **kw).item()
    assert got == pytest.approx(expected, rel=1e-9)


def test_minmax_keeps_every_one_of_the_top_k():
    # issue 17: (z - min) / (max - min) zeroed the k-th value, so top-k acted as top-(k-1)
    z = torch.tensor([[[4.0, 3.0, 2.0, 1.0]]], dtype=torch.float64)
    out, _, _ = topk_values(z, 4, values="logits", normalize="minmax")
    torch.testing.assert_close(out, torch.tensor([[[1.0, 0.75, 0.5, 0.25]]], dtype=torch.float64))
    assert (out > 0).all()
    # the k-th logit matters: changing it changes the loss (it did not before)
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(1, 5, 50, generator=gen, dtype=torch.float64)
    lg, ids = torch.topk(x, 4, dim=-1)
    a = TopK(lg, ids, None, 50)
    lg2 = lg.clone()
    lg2[..., 3] -= 0.5
    b = TopK(lg2, ids, None, 50)
    assert gld_loss(a, b, top_k=4, values="logits", normalize="minmax").item() > 1e-3
    # invariant to shifting and scaling each position's logits (temperature has no effect on it)
    y = x * 3.0 + torch.randn(1, 5, 1, generator=gen, dtype=torch.float64)
    assert gld_loss(x, y, top_k=4, values="logits", normalize="minmax").item() == pytest.approx(0.0, abs=1e-12)


def test_from_logits_keeps_float64():
    # issue 17: logsumexp was computed in float32 for float64 inputs
    x = torch.randn(3, 5000, dtype=torch.float64) * 10
    tk = TopK.from_logits(x, 4)
    assert tk.lse.dtype == torch.float64
    assert (tk.lse - torch.logsumexp(x, -1)).abs().max().item() < 1e-12
    assert TopK.from_logits(x.half(), 4).lse.dtype == torch.float16


@pytest.mark.parametrize("feature,p", [("degree", 1), ("degree", 2), ("self", 1), ("l2", 2)])
def test_default_scale_is_the_closed_form_gw_on_rank_graphs(feature, p):
    # scale="gw": the loss on k rank nodes equals sorted_gw of the dense k x k graphs
    gen = torch.Generator().manual_seed(23)
    xs = torch.randn(1, 7, 30, generator=gen, dtype=torch.float64)
    xt = torch.randn(1, 9, 40, generator=gen, dtype=torch.float64)
    zs, _, _ = topk_values(xs, 5)
    zt, _, _ = topk_values(xt, 5)
    c = co_activation_graph(zs, nodes="rank")[0]
    d = co_activation_graph(zt, nodes="rank")[0]
    expected = sorted_gw(c, d, feature, p).item()
    assert gld_loss(xs, xt, top_k=5, feature=feature, p=p).item() == pytest.approx(expected, rel=1e-10)
    raw = gld_loss(xs, xt, top_k=5, feature=feature, p=p, scale="sum").item()
    assert raw > gld_loss(xs, xt, top_k=5, feature=feature, p=p).item()
    # with minmax values every entry of the graphs is in [0, 1], so the default loss is too
    assert 0.0 <= gld_loss(xs * 50, xt, top_k=5).item() <= 1.0

#!/usr/bin/env python
"""Benchmark the GLD term: per training step against token-wise KL, and against POT's exact GW.

    python scripts/bench_gld.py                      # CPU, defaults below
    python scripts/bench_gld.py --device cuda --vocab 151936 --seq 1024
    python scripts/bench_gld.py --json out.json

Part 1 (per step): forward + backward of each loss on student logits
[batch, seq, vocab] (requires grad) against a cached teacher top-k (another
vocabulary, another length): ``gld_loss`` (vocab nodes, degree, p = 1) and the
token-wise KL on the aligned positions (teacher top-k ids mapped into the
student's vocabulary), and ULD (the paper's token-wise term).
``--gld`` passes gld_loss options (default: its defaults).

Part 2 (the graph comparison itself): per sequence, the co-activation graphs over
the k rank slots (k x k, the graph the paper's figure draws) compared by the
sorted-degree closed form and by POT's exact solver
(``ot.gromov.gromov_wasserstein2``, square loss, uniform weights), with the
closed form's value next to POT's (the closed form is a lower bound, GW~_2 <= GW_2).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgeon.fusion.gld import TopK, co_activation_graph, gld_loss, sorted_gw, topk_values  # noqa: E402
from surgeon.fusion.tokenwise import kl_loss, uld_loss  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn, device: str, repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_step(k: int, args: argparse.Namespace) -> dict:
    g = torch.Generator().manual_seed(k)
    dev = args.device
    student = torch.randn(args.batch, args.seq, args.vocab, generator=g).to(dev).requires_grad_(True)
    t_len = int(args.seq * 1.1)
    teacher_logits = torch.randn(args.batch, t_len, args.teacher_vocab, generator=g).to(dev) * 2
    teacher = TopK.from_logits(teacher_logits, k)
    del teacher_logits
    # aligned positions: every student position paired with a teacher position
    b = torch.arange(args.batch, device=dev).repeat_interleave(args.seq)
    u = torch.arange(args.seq, device=dev).repeat(args.batch)
    v = (u.float() * 1.1).long().clamp_max(t_len - 1)
    mapped = teacher.ids[b, v] % args.vocab  # stand-in vocabulary map
    probs = (teacher.logits[b, v] - teacher.lse[b, v].unsqueeze(-1)).exp()

    def run_gld():
        student.grad = None
        gld_loss(student, teacher, top_k=k, **args.gld_opts).backward()

    def run_kl():
        student.grad = None
        kl_loss(student[b, u], probs, target_ids=mapped).backward()

    def run_uld():
        student.grad = None
        uld_loss(student[b, u], TopK(teacher.logits[b, v], teacher.ids[b, v], teacher.lse[b, v], teacher.vocab_size),
                 top_k=k).backward()

    def run_ce():
        student.grad = None
        torch.nn.functional.cross_entropy(student.reshape(-1, args.vocab),
                                          torch.zeros(args.batch * args.seq, dtype=torch.long, device=dev)).backward()

    return {"k": k, "gld_ms": 1e3 * timeit(run_gld, dev, args.repeat), "kl_ms": 1e3 * timeit(run_kl, dev, args.repeat),
            "uld_ms": 1e3 * timeit(run_uld, dev, args.repeat), "ce_ms": 1e3 * timeit(run_ce, dev, args.repeat)}


def bench_pot(k: int, args: argparse.Namespace) -> dict:
    import ot

    g = torch.Generator().manual_seed(100 + k)
    xs = torch.randn(1, args.pot_seq, max(args.vocab, k), generator=g, dtype=torch.float64)
    xt = torch.randn(1, args.pot_seq + 7, max(args.teacher_vocab, k), generator=g, dtype=torch.float64) * 2
    zs, _, _ = topk_values(xs, k, values="probs", normalize="none")
    zt, _, _ = topk_values(xt, k, values="probs", normalize="none")
    c = co_activation_graph(zs, nodes="rank")[0]
    d = co_activation_graph(zt, nodes="rank")[0]
    p = torch.full((k,), 1.0 / k, dtype=torch.float64).numpy()
    cn, dn = c.numpy(), d.numpy()
    t = time.perf_counter()
    exact = float(ot.gromov.gromov_wasserstein2(cn, dn, p, p, loss_fun="square_loss"))
    pot_s = time.perf_counter() - t
    # one thread: on a k x k graph, waking a thread pool costs more than the arithmetic
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        closed_s = timeit(lambda: sorted_gw(c, d, "degree", 2), "cpu", max(5, args.repeat))
    finally:
        torch.set_num_threads(threads)
    closed = float(sorted_gw(c, d, "degree", 2))
    return {"k": k, "nodes": k, "pot_ms": 1e3 * pot_s, "closed_ms": 1e3 * closed_s,
            "speedup": pot_s / max(closed_s, 1e-9), "pot_gw2": exact, "closed_gw2": closed,
            "ratio": closed / exact if exact > 0 else float("nan")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", default="16,64,256")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--teacher-vocab", type=int, default=50000)
    ap.add_argument("--pot-seq", type=int, default=64, help="positions aggregated into each POT graph")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--gld", default="{}", help='gld_loss options as JSON (default: its defaults, the paper\'s '
                    'top-k logits on k rank nodes), e.g. \'{"values": "probs", "nodes": "vocab"}\'')
    ap.add_argument("--no-pot", action="store_true", help="skip part 2 (POT)")
    args = ap.parse_args(argv)
    args.gld_opts = json.loads(args.gld)
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = [int(x) for x in args.ks.split(",")]
    print(f"device {args.device}, threads {torch.get_num_threads()}, student [{args.batch}, {args.seq}, {args.vocab}], "
          f"teacher vocab {args.teacher_vocab}; forward+backward, median of {args.repeat}")
    print(f"{'k':>5} {'GLD ms':>9} {'KL ms':>9} {'ULD ms':>9} {'CE ms':>9} {'GLD/KL':>7}")
    steps = []
    for k in ks:
        r = bench_step(k, args)
        steps.append(r)
        print(f"{k:>5} {r['gld_ms']:9.1f} {r['kl_ms']:9.1f} {r['uld_ms']:9.1f} {r['ce_ms']:9.1f} {r['gld_ms'] / r['kl_ms']:7.2f}")
    if args.no_pot:
        ks = []
    print(f"\ngraph comparison, k x k co-activation graphs from {args.pot_seq} positions (one sequence):")
    print(f"{'k':>5} {'POT exact ms':>13} {'closed ms':>10} {'speedup':>9} {'POT GW2':>11} {'closed GW2':>11} {'ratio':>6}")
    pots = []
    for k in ks:
        r = bench_pot(k, args)
        pots.append(r)
        print(f"{k:>5} {r['pot_ms']:13.1f} {r['closed_ms']:10.3f} {r['speedup']:9.0f} {r['pot_gw2']:11.3e} "
              f"{r['closed_gw2']:11.3e} {r['ratio']:6.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "step": steps, "pot": pots}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

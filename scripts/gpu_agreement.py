"""Every merge method on CPU and on CUDA from the same inputs: results agree within float32 rounding.

Random methods draw counter-based uniforms (surgeon/merge/rng.py), the same
numbers on every device, so they run with densities that prune: their masks
must agree too. Run on a machine with a GPU.
"""
from __future__ import annotations

import time

import torch

from surgeon.merge import TensorMerge, all_methods

#: per-model parameters that make the random methods draw (their defaults keep everything)
PRUNING = {"dare_linear": {"density": 0.5}, "dare_ties": {"density": 0.5}, "della": {"density": 0.5},
           "della_linear": {"density": 0.5}}


def main() -> None:
    other = "cuda" if torch.cuda.is_available() else "cpu"
    if other == "cpu":
        print("no CUDA device: comparing CPU with CPU (a dry run of this script)")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1024, 2048, generator=g)
    models = [base + 0.01 * torch.randn(base.shape, generator=g) for _ in range(3)]
    print(f"{'method':<18} {'max |cpu-gpu|':>14} {'rel':>10} {'cpu ms':>8} {'gpu ms':>8}")
    for name, m in all_methods().items():
        n = 1 if (m.max_models == 1) else (3 if m.min_models <= 3 else m.min_models)
        mp = []
        for _ in range(n):
            p = {}
            for prm in m.model_params:
                p[prm.name] = prm.default if not prm.required else 1.0
            p.update({k: v for k, v in PRUNING.get(name, {}).items() if any(q.name == k for q in m.model_params)})
            mp.append(p)
        gp = {prm.name: (prm.default if not prm.required else 0.5) for prm in m.global_params}
        results = {}
        times = {}
        for label, dev in (("cpu", "cpu"), ("gpu", other)):
            b = base.to(dev) if m.needs_base else None
            ms = [x.to(dev) for x in models[:n]]
            tm = TensorMerge("model.layers.0.mlp.up_proj.weight", b, ms, mp, gp, seed=0)
            if m.prepare is not None:
                tm.state = m.prepare([tm], gp)
            m.fn(tm)  # warm-up
            if dev != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = m.fn(tm)
            if dev != "cpu":
                torch.cuda.synchronize()
            times[label] = (time.perf_counter() - t0) * 1000
            results[label] = out.float().cpu()
        d = (results["cpu"] - results["gpu"]).abs().max().item()
        rel = d / max(results["cpu"].abs().max().item(), 1e-12)
        print(f"{name:<18} {d:>14.3g} {rel:>10.2g} {times['cpu']:>8.1f} {times['gpu']:>8.1f}")


if __name__ == "__main__":
    main()

"""MPN test-time refinement (intra-batch-mpn-reproduction Sec. 3.4): ``refine_over_batches`` vs whole forwards.

Every one of N images is refined inside its own batch of B nodes. ``refine_over_batches`` projects
the first layer once per node and updates only the query's node in the last layer, over
``--chunk`` graphs at a time. Baselines: the whole MPN forward on the same stacked graphs, and one
forward per query, as a research loop over a DataLoader of single batches does. All three must give
the same features.

    python bench/mpn_refine.py --n 10000 --dim 512 --batch 30 --threads 2
"""
from __future__ import annotations

import argparse
import time

import torch

from dml_ray.models.mpn import MessagePassingNetwork, refine_over_batches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=30)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    mpn = MessagePassingNetwork(100, num_layers=args.layers, num_heads=args.heads, dim=args.dim).eval()
    features = torch.randn(args.n, args.dim, generator=gen)
    rows = torch.arange(args.n)
    batches = torch.cat([rows[:, None], torch.randint(0, args.n, (args.n, args.batch - 1), generator=gen)], 1)

    start = time.perf_counter()
    batched = refine_over_batches(mpn, features, batches, rows, chunk=args.chunk)
    t_batched = time.perf_counter() - start

    start = time.perf_counter()
    with torch.no_grad():
        whole = torch.cat([mpn(features[batches[a:a + args.chunk]]).features[:, 0]
                           for a in range(0, args.n, args.chunk)])
    t_whole = time.perf_counter() - start

    start = time.perf_counter()
    with torch.no_grad():
        loop = torch.stack([mpn(features[batches[i]]).features[0] for i in range(args.n)])
    t_loop = time.perf_counter() - start

    torch.testing.assert_close(batched, loop, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(whole, loop, rtol=1e-4, atol=1e-4)
    print(f"N={args.n} d={args.dim} B={args.batch} L={args.layers} M={args.heads} threads={args.threads}")
    for name, seconds in (("refine_over_batches", t_batched), ("whole forward, stacked graphs", t_whole),
                          ("one forward per query", t_loop)):
        print(f"{name:30s} {seconds:7.2f} s  {args.n / seconds:8,.0f} queries/s  {t_loop / seconds:6.1f}x")
    print("same features on all three")


if __name__ == "__main__":
    main()

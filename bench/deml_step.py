"""DeML training-step throughput relative to the U512 baseline, measured side by side in one process.

Each model is a random-init GoogLeNet DeML (deml-zero-shot-retrieval Sec. 3) trained by its
``DeMLObjective`` (binomial deviance per learner, activation decay, L_ntri, adversary behind a GRL)
with Adam, exactly as ``dml_ray.training.train_epoch`` runs a step: forward, objective, backward,
optimizer step. Rounds alternate between the models (one timed step each per round, after warm-up
steps), so a change in machine load hits every model alike; the figure is images/s of each and its
ratio to U512.

    python bench/deml_step.py --size 224 --batch 16 --rounds 4 --threads 2
"""
from __future__ import annotations

import argparse
import logging
import time

import torch

from dml_ray.config import LossConfig, ModelConfig, OptimizerConfig, TrainConfig
from dml_ray.models.embedding import build_model
from dml_ray.objectives import build_objective
from dml_ray.training import build_optimizer

# name -> (I, J, channel attention); U512 is the paper's baseline (Sec. 4 notation)
MODELS: dict[str, tuple[int, int, bool]] = {
    "u512": (1, 1, False),
    "i1_j1": (1, 1, True),
    "i1_j4": (1, 4, True),
    "i1_j8": (1, 8, True),
    "i2_j4": (2, 4, True),
    "i3_j3": (3, 3, True),
}


def _setup(name: str, size: int, classes: int):
    scales, branches, cam = MODELS[name]
    torch.manual_seed(0)
    cfg = ModelConfig(kind="deml", backbone="googlenet", embedding_dim=512,
                      deml={"scales": scales, "branches": branches, "channel_attention": cam})
    model = build_model(cfg, size).train()
    train = TrainConfig(loss=LossConfig(name="binomial_deviance"),
                        optimizer=OptimizerConfig(lr=1e-5, weight_decay=2e-4, head_lr_multiplier=10))
    objective = build_objective(cfg, train, classes, model.embedding_dim).train()
    return model, objective, build_optimizer(train.optimizer, model, objective)


def _step(model, objective, optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    loss, _ = objective(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="input side (paper: 224)")
    parser.add_argument("--batch", type=int, default=16, help="images per step (P x K with K = 4)")
    parser.add_argument("--rounds", type=int, default=4, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="u512,i1_j4,i3_j3", help=f"comma-separated: {', '.join(MODELS)}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    names = args.models.split(",")
    if names[0] != "u512":
        names = ["u512", *[n for n in names if n != "u512"]]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    y = torch.arange(args.batch) // 4
    setups = {n: _setup(n, args.size, int(y.max()) + 1) for n in names}
    for n in names:
        for _ in range(args.warmup):
            _step(*setups[n], x, y)
    seconds = {n: 0.0 for n in names}
    for _ in range(args.rounds):
        for n in names:
            seconds[n] += _step(*setups[n], x, y)
    rate = {n: args.rounds * args.batch / seconds[n] for n in names}
    print(f"GoogLeNet DeML training step, {args.size} x {args.size}, batch {args.batch}, {args.threads} threads, "
          f"{args.rounds} timed steps each (interleaved)")
    print(f"{'model':8s} {'learners':>8s} {'s/step':>8s} {'images/s':>9s} {'vs U512':>8s}")
    for n in names:
        scales, branches, _ = MODELS[n]
        print(f"{n:8s} {scales * branches:8d} {seconds[n] / args.rounds:8.2f} {rate[n]:9.2f} "
              f"{rate[n] / rate['u512']:8.3f}")


if __name__ == "__main__":
    main()

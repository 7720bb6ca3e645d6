"""The models ``vcas bench`` times: shapes that matter for fine-tuning, built from configs
(random weights: the timing depends on the shapes, not on the values)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class Workload:
    """One model, one fixed batch and the loss of a training step on it."""

    name: str
    description: str
    model: nn.Module
    inputs: dict[str, torch.Tensor]
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]

    def to(self, device: torch.device) -> Workload:
        self.model.to(device)
        self.inputs = {k: v.to(device) for k, v in self.inputs.items()}
        return self


@dataclasses.dataclass(frozen=True)
class Preset:
    description: str
    batch: int
    seq: int
    layers: int
    build: Callable[[Preset, int, int, int], Workload]


def _hf_loss(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).loss


def _text_inputs(config: Any, batch: int, seq: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, config.vocab_size, (batch, seq), generator=generator),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
            "labels": torch.randint(0, config.num_labels, (batch,), generator=generator)}


def _bert(hidden: int, heads: int) -> Callable[[Preset, int, int, int], Workload]:
    def build(preset: Preset, batch: int, seq: int, layers: int) -> Workload:
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                            intermediate_size=4 * hidden, num_labels=5, attn_implementation="eager")
        generator = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = BertForSequenceClassification(config)
        return Workload(f"BERT hidden {hidden}, {layers} layers, batch {batch}, seq {seq}",
                        preset.description, model, _text_inputs(config, batch, seq, generator), _hf_loss)
    return build


def _vit(preset: Preset, batch: int, seq: int, layers: int) -> Workload:
    from transformers import ViTConfig, ViTForImageClassification

    patch = 16
    side = patch * max(1, round((seq - 1) ** 0.5))  # seq counts the patches plus the class token
    config = ViTConfig(hidden_size=384, num_attention_heads=6, num_hidden_layers=layers,
                       intermediate_size=1536, image_size=side, patch_size=patch, num_labels=10,
                       attn_implementation="eager")
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ViTForImageClassification(config)
    inputs = {"pixel_values": torch.randn(batch, 3, side, side, generator=generator),
              "labels": torch.randint(0, 10, (batch,), generator=generator)}
    tokens = (side // patch) ** 2 + 1
    return Workload(f"ViT-S hidden 384, {layers} layers, batch {batch}, {tokens} tokens",
                    preset.description, model, inputs, _hf_loss)


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3x3 convolutions with BatchNorm and a shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet (two basic blocks per stage) with BatchNorm frozen, as in fine-tuning."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, c_in = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(2):
                blocks.append(BasicBlock(c_in, width, 2 if (j == 0 and i > 0) else 1))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, classes)

    def train(self, mode: bool = True) -> ResNet:
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()  # frozen statistics: samples stay independent in the backward
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _resnet(preset: Preset, batch: int, seq: int, layers: int) -> Workload:
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    inputs = {"images": torch.randn(batch, 3, seq, seq, generator=generator),
              "labels": torch.randint(0, 10, (batch,), generator=generator)}

    def loss(model: nn.Module, batch_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(batch_inputs["images"]), batch_inputs["labels"])
    return Workload(f"ResNet-18 layout (widths 32-256, frozen BatchNorm), batch {batch}, {seq}x{seq}",
                    preset.description, ResNet(), inputs, loss)


PRESETS: dict[str, Preset] = {
    "minilm": Preset("MiniLM-L6 shape: BERT, 6 layers, hidden 384, eager attention", 32, 128, 6, _bert(384, 12)),
    "bert-base": Preset("BERT-base block stack: hidden 768, 12 heads, eager attention", 32, 128, 2, _bert(768, 12)),
    "vit": Preset("ViT-S/16 block stack: hidden 384, 6 heads, 224x224 images", 32, 197, 4, _vit),
    "resnet": Preset("ResNet-18 layout on 32x32 images, BatchNorm frozen", 64, 32, 8, _resnet),
}


def build_preset(name: str, batch: int | None = None, seq: int | None = None,
                 layers: int | None = None) -> Workload:
    preset = PRESETS[name]
    return preset.build(preset, batch or preset.batch, seq or preset.seq, layers or preset.layers)


def build_from_config(path: str, batch: int, seq: int, layers: int | None = None) -> Workload:
    """Any local transformers checkpoint or config directory, as a sequence classifier."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path)
    if layers is not None:
        config.num_hidden_layers = layers
    config.num_labels = 5
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = 0
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    generator = torch.Generator().manual_seed(0)
    return Workload(f"{path}: {config.num_hidden_layers} layers, batch {batch}, seq {seq}",
                    f"transformers config {path}", model, _text_inputs(config, batch, seq, generator),
                    _hf_loss)

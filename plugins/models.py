"""Built-in models: ``vgg_small``, a small VGG-style SNN for 28x28 and 8x8 inputs."""

from __future__ import annotations

from typing import Annotated

from torch import nn

from harness import Length, Range, hookimpl
from harness.snn import AvgPool, GlobalAvgPool, LayerFactory, SpikingSequential


def vgg_small(
    in_channels: int,
    num_classes: int,
    input_size: tuple[int, int],
    layers: LayerFactory,
    channels: Annotated[list[int], Length(min=1), Range(1)] = [32, 64, 128],  # noqa: B006 - read-only default, shown by `harness list`
) -> SpikingSequential:
    """Small VGG-style SNN: stages of conv3x3 -> normalizer -> LIF, 2x2 average pooling between
    stages, global average pooling and a non-spiking linear readout (logits at every step).

    28x28 inputs with the default channels: 32@28 -> pool -> 64@14 -> pool -> 128@7 -> GAP -> FC.
    The convolutions keep their bias (as the official code does).
    """
    if not channels:
        raise ValueError("vgg_small needs at least one stage in `channels`")
    body: list[nn.Module] = []
    size = min(input_size)
    c_in = in_channels
    for i, c in enumerate(channels):
        body += [nn.Conv2d(c_in, c, kernel_size=3, padding=1, bias=True), layers.normalizer(c), layers.neuron(c)]
        if i < len(channels) - 1 and size >= 2:
            body.append(AvgPool(2))
            size //= 2
        c_in = c
    readout = nn.Linear(c_in, num_classes)
    nn.init.normal_(readout.weight, 0.0, 0.01)  # FC initialised N(0, 0.01) as in the official VGGSNN
    nn.init.zeros_(readout.bias)
    body += [GlobalAvgPool(), readout]
    return SpikingSequential(*body)


@hookimpl
def register_models(registry) -> None:
    registry.add("vgg_small", vgg_small)

"""The paper's architectures (docs/method.md section 8; Appendix C): ``vggsnn``, ``resnet19``,
``sew_resnet34`` and ``nf_resnet34``, built after the official code
(github.com/zhuyaoyu/SNN-online-normalization, ``models/``) with the harness's step protocol.

Every normalizer and neuron comes from the cell's :class:`harness.snn.LayerFactory`
(``layers.normalizer(C)``, ``layers.neuron(C)``), so any registered normalizer, threshold policy
and membrane normalization fits. Each model maps ``[T, B, C, H, W]`` to logits ``[T, B, classes]`` in sequence mode and
``[B, C, H, W]`` to ``[B, classes]`` in single mode (both modes for all four models; a
sequence-only normalizer such as ``tdbn`` restricts the cell to sequence mode, as usual).

Every model takes ``dropout`` (float, default 0): *neuron dropout* after every spiking neuron of
the feature extractor, with one mask per sequence (drawn at the first step, reused for every step,
scaled by ``1 / (1 - p)``, off in eval mode) -- the official neurons' ``neuron_dropout``
(:class:`SequenceDropout`).

``input_size`` (injected from the data set): VGGSNN is size-agnostic (GAP; at least 8x8);
ResNet-19 sizes its head FC from it (32x32 -> 8192 features); the ResNet-34s use the ImageNet
stem (conv7x7/2 + maxpool) from 64x64 up and a CIFAR stem (conv3x3/1, no maxpool) below, unless
``stem`` says otherwise.

Parameters with ``nn.BatchNorm2d`` (tests/test_models_paper.py derives them independently):
``vggsnn`` CIFAR-10 9,231,114, DVS-Gesture (``classifier = [1024, 1024]``, 11 classes)
10,815,691; ``resnet19`` CIFAR-10 14,669,834 (the official 8192 -> 256 head; a GAP head would give
the often quoted ~12.6M); ``sew_resnet34`` / ``nf_resnet34`` (1000 classes) 21,806,184 with the
official conv biases, 21,797,672 = torchvision's resnet34 with ``bias = false``.

Normalizers after a fully connected layer (the ResNet-19 head, the DVS-Gesture VGG classifier)
see the features as ``[..., C, 1, 1]``, so 2-d normalizers (``nn.BatchNorm2d`` and every built-in
normalizer) fit there too; the statistics are the same as over ``[..., C]``.

Build one by name from Python (the injected arguments come from the data set in a cell)::

    from harness import get_registry
    from harness.snn import LayerFactory, LIFNeuron

    registry = get_registry()
    layers = LayerFactory(
        normalizer=lambda c: registry.normalizers["osr"](num_features=c),
        neuron=lambda c=None: LIFNeuron(registry.thresholds["ots"](theta=1.0)),
    )
    net = registry.models["vggsnn"](in_channels=3, num_classes=10, input_size=(32, 32), layers=layers)

or with :func:`build`, which makes the ``LayerFactory`` the way the runner does
(``build("resnet19", normalizer="tdbn", time_steps=4)``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
from torch import Tensor, nn

from harness import Range, hookimpl
from harness.snn import AvgPool, GlobalAvgPool, LayerFactory, LIFNeuron, SequenceModule, SpikingSequential

Dropout = Annotated[float, Range(0.0, 1.0, high_open=True)]  # a probability of dropping a unit

__all__ = [
    "Residual",
    "SequenceDropout",
    "build",
    "nf_resnet34",
    "resnet19",
    "sew_resnet34",
    "vggsnn",
]

# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class SequenceDropout(SequenceModule):
    """Dropout with one mask per sequence (the official neurons' ``neuron_dropout``; SpikingJelly's
    ``layer.Dropout``): the mask ``m ~ Bernoulli(1 - p) / (1 - p)`` has the shape of one step
    ``[B, ...]``, is drawn at the first step of each sequence and multiplies every step of it.

    Single mode: drawn when ``t == 0`` (after :func:`harness.snn.begin_sequence`). Sequence mode:
    drawn once per call and broadcast over ``T``. Both modes draw the same numbers from the same
    random state, so they agree. Identity in eval mode and for ``p = 0``.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = float(p)
        self.mask: Tensor | None = None

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def begin_sequence(self, time_steps: int) -> None:
        self.mask = None

    def end_sequence(self) -> None:
        self.mask = None

    def _draw(self, step: Tensor) -> Tensor:
        keep = 1.0 - self.p
        with torch.no_grad():
            return torch.empty_like(step).bernoulli_(keep).div_(keep)

    def forward_step(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.t == 0 or self.mask is None:
            self.mask = self._draw(x)
        elif self.mask.shape != x.shape:
            raise RuntimeError(
                f"SequenceDropout: step {self.t + 1} has shape {tuple(x.shape)}, the sequence's mask "
                f"{tuple(self.mask.shape)}; call harness.snn.begin_sequence(model, T) for each sequence"
            )
        return x * self.mask

    def forward_sequence(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        self.mask = self._draw(x[0])
        return x * self.mask


class Residual(SequenceModule):
    """``post(branch(x) + shortcut(x))``: a residual block that follows the step protocol.

    ``branch``, ``shortcut`` (``None``: the identity) and ``post`` (``None``: nothing) are
    :class:`SpikingSequential` s, so in sequence mode their convolutions run once on
    ``[T*B, ...]`` and their neurons loop over time; in single mode everything runs on ``[B, ...]``.
    The addition is elementwise in both modes, so the block itself needs no state.
    """

    def __init__(self, branch: nn.Module, shortcut: nn.Module | None = None, post: nn.Module | None = None) -> None:
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut
        self.post = post

    def _forward(self, x: Tensor) -> Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        y = self.branch(x) + identity
        return y if self.post is None else self.post(y)

    def forward_step(self, x: Tensor) -> Tensor:
        return self._forward(x)

    def forward_sequence(self, x: Tensor) -> Tensor:
        return self._forward(x)


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1, bias: bool = True, zero_bias: bool = False) -> nn.Conv2d:
    """Conv with the official initialisation: Kaiming normal (fan_out, ReLU) weights; the bias
    keeps PyTorch's default (ResNets) or is zeroed (VGG, ``zero_bias``)."""
    conv = nn.Conv2d(c_in, c_out, kernel_size=kernel, stride=stride, padding=kernel // 2, bias=bias)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if bias and zero_bias:
        nn.init.zeros_(conv.bias)
    return conv


def _spiking(layers: LayerFactory, channels: int, dropout: float) -> list[nn.Module]:
    """A neuron for ``channels`` channels, followed by neuron dropout when ``dropout > 0``."""
    neuron = layers.neuron(channels)
    return [neuron, SequenceDropout(dropout)] if dropout > 0 else [neuron]


def _vector_normalizer(layers: LayerFactory, features: int) -> SpikingSequential:
    """The cell's normalizer for ``[..., C]`` features: seen as ``[..., C, 1, 1]``."""
    return SpikingSequential(nn.Unflatten(-1, (features, 1, 1)), layers.normalizer(features), nn.Flatten(-3))


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _check_size(name: str, input_size: Sequence[int], minimum: int) -> tuple[int, int]:
    if len(input_size) != 2:
        raise ValueError(f"{name}: input_size must be (H, W), got {input_size!r}")
    h, w = int(input_size[0]), int(input_size[1])
    if min(h, w) < minimum:
        raise ValueError(f"{name} needs inputs of at least {minimum}x{minimum}, got {h}x{w}")
    return h, w


# ---------------------------------------------------------------------------------------------
# VGGSNN
# ---------------------------------------------------------------------------------------------

VGGSNN_CONFIG: tuple[int | str, ...] = (64, 128, "A", 256, 256, "A", 512, 512, "A", 512, 512)


def vggsnn(
    in_channels: int,
    num_classes: int,
    input_size: tuple[int, int],
    layers: LayerFactory,
    dropout: Dropout = 0.0,
    classifier: Annotated[tuple[int, ...], Range(1)] = (),
    classifier_dropout: Dropout = 0.5,
) -> SpikingSequential:
    """VGGSNN: 64C3-128C3-AP2-256C3-256C3-AP2-512C3-512C3-AP2-512C3-512C3-GAP-FC (OTTT's VGG).

    Each C3 is conv3x3 (with bias, as the official code) -> normalizer -> LIF (-> neuron dropout
    ``dropout``); AP2 is 2x2 average pooling; GAP is global average pooling (the official
    ``fc_hw = 1``). Convolutions: Kaiming normal (fan_out) weights, zero bias; every FC layer
    N(0, 0.01) weights, zero bias (official ``_initialize_weights``). The readout is a plain
    linear layer giving logits at every step.

    ``classifier``: hidden FC sizes before the readout; ``(1024, 1024)`` is the DVS-Gesture
    variant (FC 512-1024-1024-11). Each hidden layer is FC -> normalizer -> LIF -> dropout
    ``classifier_dropout``, as the official heavy classifier (``SynapseNeuron`` = FC + BN + LIF,
    then ``Dropout()``, p = 0.5); here the dropout mask is fixed over the sequence like the neuron
    dropout, and the WS-only ``Scale(2.74)`` is left out (docs/method.md section 8: no weight standardization).
    Any ``input_size`` of at least 8x8 works (GAP after the third pooling).
    """
    _check_size("vggsnn", input_size, 8)
    body: list[nn.Module] = []
    c = in_channels
    for v in VGGSNN_CONFIG:
        if v == "A":
            body.append(AvgPool(2))
            continue
        assert isinstance(v, int)
        body += [_conv(c, v, 3, zero_bias=True), layers.normalizer(v), *_spiking(layers, v, dropout)]
        c = v
    body += [GlobalAvgPool()]
    for hidden in classifier:
        h = int(hidden)
        body += [_linear_n001(c, h), _vector_normalizer(layers, h), *_spiking(layers, h, classifier_dropout)]
        c = h
    body.append(_linear_n001(c, num_classes))
    return SpikingSequential(*body)


def _linear_n001(n_in: int, n_out: int) -> nn.Linear:
    fc = nn.Linear(n_in, n_out)
    nn.init.normal_(fc.weight, 0.0, 0.01)
    nn.init.zeros_(fc.bias)
    return fc


# ---------------------------------------------------------------------------------------------
# ResNet-19 (CIFAR)
# ---------------------------------------------------------------------------------------------


def _resnet19_block(layers: LayerFactory, c_in: int, c_out: int, stride: int, dropout: float, bias: bool) -> Residual:
    """Official ``spiking_resnet.BasicBlock``: conv-norm-LIF-conv, + shortcut, then norm and LIF
    after the addition. Shortcut: the input spikes, or conv1x1 (stride) -> norm when the shape
    changes."""
    branch = SpikingSequential(
        _conv(c_in, c_out, 3, stride, bias),
        layers.normalizer(c_out),
        *_spiking(layers, c_out, dropout),
        _conv(c_out, c_out, 3, 1, bias),
    )
    shortcut = None
    if stride != 1 or c_in != c_out:
        shortcut = SpikingSequential(_conv(c_in, c_out, 1, stride, bias), layers.normalizer(c_out))
    post = SpikingSequential(layers.normalizer(c_out), *_spiking(layers, c_out, dropout))
    return Residual(branch, shortcut, post)


def resnet19(
    in_channels: int,
    num_classes: int,
    input_size: tuple[int, int],
    layers: LayerFactory,
    dropout: Dropout = 0.0,
    bias: bool = True,
) -> SpikingSequential:
    """ResNet-19 for CIFAR (official ``OnlineSpikingResNet19``; docs/method.md section 8).

    Stem conv3x3 (128) -> norm -> LIF; stages 3x128, 3x256 (stride 2), 2x512 (stride 2) of basic
    blocks with the normalizer *after* the residual add, then LIF; head AvgPool2 ->
    FC (512*h*w -> 256) -> normalizer -> FC -> classes, no neuron between the two FC layers (as the
    official code). 32x32 inputs give 512*4*4 = 8192 head features; other sizes give
    512 * (ceil(ceil(H/2)/2) // 2) * (...W...). ``bias``: convolutions with bias (official: yes).
    Conv weights Kaiming normal (fan_out); FC layers keep PyTorch's initialisation.
    """
    h, w = _check_size("resnet19", input_size, 8)
    stages: list[nn.Module] = [
        SpikingSequential(_conv(in_channels, 128, 3, 1, bias), layers.normalizer(128), *_spiking(layers, 128, dropout))
    ]
    c = 128
    for planes, blocks, stride in ((128, 3, 1), (256, 3, 2), (512, 2, 2)):
        stage = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            stage.append(_resnet19_block(layers, c, planes, s, dropout, bias))
            c = planes
            h, w = _conv_out(h, 3, s, 1), _conv_out(w, 3, s, 1)
        stages.append(SpikingSequential(*stage))
    h, w = h // 2, w // 2
    head = SpikingSequential(
        AvgPool(2),
        nn.Flatten(),
        nn.Linear(c * h * w, 256),
        _vector_normalizer(layers, 256),
        nn.Linear(256, num_classes),
    )
    return SpikingSequential(*stages, head)


# ---------------------------------------------------------------------------------------------
# ResNet-34 variants (ImageNet)
# ---------------------------------------------------------------------------------------------

RESNET34_STAGES: tuple[tuple[int, int, int], ...] = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))
IMAGENET_STEM_MIN_SIZE = 64  # stem="auto": the ImageNet stem from 64x64 up, the CIFAR stem below


def _use_imagenet_stem(stem: str, input_size: Sequence[int]) -> bool:
    if stem not in ("auto", "imagenet", "cifar"):
        raise ValueError(f"stem must be 'auto', 'imagenet' or 'cifar', got {stem!r}")
    return stem == "imagenet" or (stem == "auto" and min(input_size) >= IMAGENET_STEM_MIN_SIZE)


def _resnet34(
    name: str,
    in_channels: int,
    num_classes: int,
    input_size: tuple[int, int],
    layers: LayerFactory,
    stem: str,
    bias: bool,
    block: Callable[[int, int, int], Residual],
    stem_neuron: list[nn.Module],
) -> SpikingSequential:
    _check_size(name, input_size, 8)
    if _use_imagenet_stem(stem, input_size):
        first = [_conv(in_channels, 64, 7, 2, bias), layers.normalizer(64), *stem_neuron, nn.MaxPool2d(3, 2, 1)]
    else:
        first = [_conv(in_channels, 64, 3, 1, bias), layers.normalizer(64), *stem_neuron]
    stages: list[nn.Module] = [SpikingSequential(*first)]
    c = 64
    for planes, blocks, stride in RESNET34_STAGES:
        stage = [block(c if i == 0 else planes, planes, stride if i == 0 else 1) for i in range(blocks)]
        stages.append(SpikingSequential(*stage))
        c = planes
    head = SpikingSequential(GlobalAvgPool(), nn.Linear(c, num_classes))
    return SpikingSequential(*stages, head)


def sew_resnet34(
    in_channels: int,
    num_classes: int,
    input_size: tuple[int, int],
    layers: LayerFactory,
    dropout: Dropout = 0.0,
    bias: bool = True,
    stem: Literal["auto", "imagenet", "cifar"] = "auto",
) -> SpikingSequential:
    """SEW-ResNet-34 (Fang et al. 2021; official ``spiking_resnet_SEW``): spike-element-wise ADD.

    Stem conv7x7/2 -> norm -> LIF -> maxpool3/2; stages [3, 4, 6, 3] of 64/128/256/512 channels;
    block: (conv3x3 -> norm -> LIF) x 2, then ADD the identity spikes, or the spikes of the
    downsample conv1x1/2 -> norm -> LIF; GAP; FC. ``bias``: convolutions with bias (official: yes;
    ``bias = false`` gives torchvision's resnet34 parameters exactly). ``stem``: ``"imagenet"``
    as above; ``"cifar"`` conv3x3/1 -> norm -> LIF without maxpool; ``"auto"`` picks the ImageNet
    stem for inputs of at least 64x64.
    """

    def block(c_in: int, c_out: int, stride: int) -> Residual:
        branch = SpikingSequential(
            _conv(c_in, c_out, 3, stride, bias),
            layers.normalizer(c_out),
            *_spiking(layers, c_out, dropout),
            _conv(c_out, c_out, 3, 1, bias),
            layers.normalizer(c_out),
            *_spiking(layers, c_out, dropout),
        )
        shortcut = None
        if stride != 1 or c_in != c_out:
            shortcut = SpikingSequential(
                _conv(c_in, c_out, 1, stride, bias), layers.normalizer(c_out), *_spiking(layers, c_out, dropout)
            )
        return Residual(branch, shortcut)

    return _resnet34("sew_resnet34", in_channels, num_classes, input_size, layers, stem, bias, block, _spiking(layers, 64, dropout))


def nf_resnet34(
    in_channels: int,
    num_classes: int,
    input_size: tuple[int, int],
    layers: LayerFactory,
    dropout: Dropout = 0.0,
    bias: bool = True,
    stem: Literal["auto", "imagenet", "cifar"] = "auto",
) -> SpikingSequential:
    """NF-ResNet-34, as the paper uses the name (Table 1 footnote; official ``spiking_resnet_NF``):
    pre-activation blocks that carry the membrane (analog) stream in the shortcut; no weight
    standardization, no alpha/beta scaling (the footnote: OTTT's normalizer-free parts removed).

    Stem conv7x7/2 -> norm -> maxpool3/2, *no neuron*; stages [3, 4, 6, 3] of 64/128/256/512;
    block: LIF -> conv3x3 -> norm -> LIF -> conv3x3 -> norm, + the analog input, or
    conv1x1/2 -> norm of the analog input (official: the downsample sees the analog stream, not
    spikes); GAP; FC on the analog stream (no final neuron, as the official code). ``bias`` and
    ``stem`` as in ``sew_resnet34`` (``"cifar"``: conv3x3/1 -> norm).
    """

    def block(c_in: int, c_out: int, stride: int) -> Residual:
        branch = SpikingSequential(
            *_spiking(layers, c_in, dropout),
            _conv(c_in, c_out, 3, stride, bias),
            layers.normalizer(c_out),
            *_spiking(layers, c_out, dropout),
            _conv(c_out, c_out, 3, 1, bias),
            layers.normalizer(c_out),
        )
        shortcut = None
        if stride != 1 or c_in != c_out:
            shortcut = SpikingSequential(_conv(c_in, c_out, 1, stride, bias), layers.normalizer(c_out))
        return Residual(branch, shortcut)

    return _resnet34("nf_resnet34", in_channels, num_classes, input_size, layers, stem, bias, block, [])


# ---------------------------------------------------------------------------------------------
# Registration and a helper to build by name
# ---------------------------------------------------------------------------------------------

MODELS: dict[str, Callable[..., SpikingSequential]] = {
    "vggsnn": vggsnn,
    "resnet19": resnet19,
    "sew_resnet34": sew_resnet34,
    "nf_resnet34": nf_resnet34,
}


@hookimpl
def register_models(registry) -> None:
    for name, factory in MODELS.items():
        registry.add(name, factory)


def _registry() -> Any:
    """The installed registry; with this module added when its entry point is not installed."""
    from harness import get_registry

    registry = get_registry()
    if all(name in registry.models for name in MODELS):
        return registry
    return get_registry(extra_plugins=[(sys.modules[__name__], "models_paper")])


def build(
    name: str,
    *,
    in_channels: int = 3,
    num_classes: int = 10,
    input_size: tuple[int, int] = (32, 32),
    normalizer: str = "vanilla_bn",
    threshold: str = "fixed",
    time_steps: int = 4,
    normalizer_options: Mapping[str, Any] | None = None,
    threshold_options: Mapping[str, Any] | None = None,
    neuron_options: Mapping[str, Any] | None = None,
    membrane_norm: str = "none",
    membrane_norm_options: Mapping[str, Any] | None = None,
    registry: Any = None,
    **model_options: Any,
) -> nn.Module:
    """Build model ``name`` from the registry with a named normalizer, threshold policy and
    membrane normalization, the way ``harness.build.build_model`` does (a normalizer that takes
    ``time_steps`` or ``v_threshold`` gets ``time_steps`` / the policy's ``theta``).
    ``neuron_options`` go to :class:`LIFNeuron` (``tau``, ``reset``, ...); ``model_options`` to
    the model factory."""
    registry = registry if registry is not None else _registry()
    norm_opts = dict(normalizer_options or {})
    policy_opts = dict(threshold_options or {})
    norm_info = registry.normalizers.info(normalizer)
    provided = {"time_steps": time_steps, "v_threshold": policy_opts.get("theta", 1.0)}
    norm_extra = {k: v for k, v in provided.items() if norm_info.takes(k) and k not in norm_opts}
    norm_factory, policy_factory = registry.normalizers[normalizer], registry.thresholds[threshold]
    neuron_kwargs = dict(neuron_options or {})
    mn_info, mn_opts = registry.membrane_norms.info(membrane_norm), dict(membrane_norm_options or {})
    mn_extra = {"time_steps": time_steps} if mn_info.takes("time_steps") else {}

    def neuron(c: int | None = None) -> LIFNeuron:
        mn = None if c is None and membrane_norm == "none" else mn_info.factory(num_features=c, **mn_extra, **mn_opts)
        return LIFNeuron(policy_factory(**policy_opts), membrane_norm=mn, **neuron_kwargs)

    layers = LayerFactory(normalizer=lambda c: norm_factory(num_features=c, **norm_extra, **norm_opts), neuron=neuron)
    return registry.models[name](
        in_channels=in_channels, num_classes=num_classes, input_size=tuple(input_size), layers=layers, **model_options
    )

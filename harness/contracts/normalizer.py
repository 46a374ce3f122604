"""The normalizer contract: what a module registered through ``register_normalizers`` must do.

Subclass :class:`NormalizerContract` in a test module with one line, ``name = "my_norm"``, and
pytest runs every clause on it. The module is run the way the harness runs it: built by its
factory (with ``time_steps`` and ``v_threshold`` when it takes them), inside a
:class:`harness.snn.SpikingSequential`, in every step mode it declares.

What a normalizer may declare (class attributes of the module):

* ``step_modes`` -- ``{"single", "sequence"}`` (the default) or one of them.
* ``batch_dependent_eval = True`` -- its evaluation output depends on the rest of the batch
  (statistics of the test batch); the batch-independence clause is then skipped.
* ``synchronized_statistics = True`` -- its training statistics are those of the union batch
  under ``torch.distributed`` (it computes them with :mod:`harness.snn.distributed`); the clause
  of synchronized statistics then checks two gloo processes against one.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

from harness.contracts._common import (
    Contract,
    assert_close,
    assert_finite,
    draw_parameters,
    other_device,
    portable_plugins,
    restore_plugins,
)
from harness.registry import ComponentInfo, Registry, get_registry
from harness.snn import SequenceModule, SpikingSequential, begin_sequence, run_sequence

SHAPES = ("vector", "image")  # [B, C] (after a linear synapse) and [B, C, H, W] (after a convolution)


def build_normalizer(registry: Registry, name: str, options: dict[str, Any], num_features: int, time_steps: int,
                     v_threshold: float, seed: int = 0) -> nn.Module:
    """The normalizer as a cell builds it, its parameters drawn from ``seed`` (not 1 and 0: a
    gradient or a wrong affine transform must show)."""
    info = registry.normalizers.info(name)
    provided = {"time_steps": time_steps, "v_threshold": v_threshold}
    torch.manual_seed(seed)
    module = info.factory(num_features=num_features, **{k: v for k, v in provided.items() if info.takes(k)}, **options)
    draw_parameters(module, seed)
    return module


def buffers(net: nn.Module) -> dict[str, Tensor]:
    """The state that is not a parameter: running statistics, counters."""
    params = dict(net.named_parameters())
    return {k: v.detach().clone() for k, v in net.state_dict().items() if k not in params}


def train_sequence(net: nn.Module, x: Tensor, grad_out: Tensor, mode: str) -> dict[str, Any]:
    """One training sequence: the output, the input gradient and the parameter gradients of
    ``sum(y * grad_out)``, and the buffers after it."""
    net.train()
    x = x.clone().requires_grad_(True)
    y = run_sequence(net, x, mode)
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad((y * grad_out).sum(), [x, *(p for _, p in named)], allow_unused=True)
    return {"y": y.detach(), "gx": grads[0], "gp": list(grads[1:]), "names": [n for n, _ in named], "buffers": buffers(net)}


def _sync_share(rank: int, plugins: tuple, autoload: bool, name: str, options: dict[str, Any], num_features: int,
                time_steps: int, v_threshold: float, mode: str, sequences: list[tuple[Tensor, Tensor]],
                split: int) -> list[dict[str, Any]]:
    """In one of the two gloo processes: train on this rank's share of each union batch."""
    registry = get_registry(autoload=autoload, extra_plugins=list(restore_plugins(plugins)))
    net = SpikingSequential(build_normalizer(registry, name, options, num_features, time_steps, v_threshold))
    lo, hi = (0, split) if rank == 0 else (split, None)
    return [train_sequence(net, x[:, lo:hi], g[:, lo:hi], mode) for x, g in sequences]


class NormalizerContract(Contract):
    """The clauses every normalizer must pass. Set ``name``; optionally ``options``, ``plugins``,
    and the sizes below (tiny by default)."""

    kind = "normalizer"
    num_features: ClassVar[int] = 3
    time_steps: ClassVar[int] = 3
    batch: ClassVar[int] = 4
    spatial: ClassVar[tuple[int, int]] = (3, 3)
    v_threshold: ClassVar[float] = 1.0

    # -- building and inputs ---------------------------------------------------------------

    def build(self, registry: Registry, seed: int = 0) -> nn.Module:
        """The normalizer inside a ``SpikingSequential``, as a model holds it."""
        return SpikingSequential(build_normalizer(registry, self.name, dict(self.options), self.num_features,
                                                  self.time_steps, self.v_threshold, seed))

    def inputs(self, shape: str = "image", seed: int = 0, batch: int | None = None) -> tuple[Tensor, Tensor]:
        """A synaptic input ``[T, B, C(, H, W)]`` and an upstream gradient of its shape."""
        size = (self.time_steps, batch or self.batch, self.num_features, *(self.spatial if shape == "image" else ()))
        g = torch.Generator().manual_seed(1000 + seed)
        x = torch.randn(size, generator=g) * 2 + 0.5
        x = x * (1 + torch.arange(self.time_steps).view(-1, *[1] * (len(size) - 1)))  # the scale drifts over time
        return x, torch.randn(size, generator=g)

    @staticmethod
    def modes(contract_info: ComponentInfo) -> list[str]:
        return sorted(contract_info.step_modes)

    # -- clauses -----------------------------------------------------------------------------

    @pytest.mark.parametrize("shape", SHAPES)
    def test_shapes_in_every_declared_step_mode(self, contract_registry: Registry, contract_info: ComponentInfo, shape: str) -> None:
        """``[T, B, C]`` and ``[T, B, C, H, W]`` sequences (``[B, C(, H, W)]`` per step) come out in
        the input's shape and dtype, finite, in training and in evaluation, in every declared mode."""
        x, g = self.inputs(shape)
        for mode in self.modes(contract_info):
            net = self.build(contract_registry)
            out = train_sequence(net, x, g, mode)
            where = f"{self.name} ({mode} mode, {shape} input {tuple(x.shape)}, training)"
            assert out["y"].shape == x.shape, f"{where}: output shape {tuple(out['y'].shape)}"
            assert out["y"].dtype == x.dtype, f"{where}: output dtype {out['y'].dtype}"
            assert_finite(out["y"], where)
            with torch.no_grad():
                y = run_sequence(net.eval(), x, mode)
            assert y.shape == x.shape, f"{self.name} ({mode} mode, {shape} input, evaluation): output shape {tuple(y.shape)}"
            assert_finite(y, f"{self.name} ({mode} mode, {shape} input, evaluation)")

    def test_step_modes_agree(self, contract_registry: Registry, contract_info: ComponentInfo) -> None:
        """Declaring both modes promises the same numbers: one step at a time and the whole
        sequence give the same outputs, input and parameter gradients, and buffers, over two
        training sequences and then in evaluation."""
        if contract_info.step_modes != {"single", "sequence"}:
            pytest.skip(f"{self.name} declares only {sorted(contract_info.step_modes)}")
        single, whole = self.build(contract_registry), self.build(contract_registry)
        for seq in range(2):
            x, g = self.inputs("image", seed=seq)
            a, b = train_sequence(single, x, g, "single"), train_sequence(whole, x, g, "sequence")
            where = f"{self.name}, training sequence {seq + 1}, single-step against whole-sequence"
            assert_close(a["y"], b["y"], f"{where}: outputs", self.rtol, self.atol)
            assert_close(a["gx"], b["gx"], f"{where}: input gradients", self.rtol, self.atol)
            for pname, ga, gb in zip(a["names"], a["gp"], b["gp"], strict=True):
                assert_close(ga, gb, f"{where}: gradient of {pname}", self.rtol, self.atol)
            assert a["buffers"].keys() == b["buffers"].keys()
            for key in a["buffers"]:
                assert_close(a["buffers"][key], b["buffers"][key], f"{where}: buffer {key}", self.rtol, self.atol)
        x, _ = self.inputs("image", seed=5)
        with torch.no_grad():
            assert_close(run_sequence(single.eval(), x, "single"), run_sequence(whole.eval(), x, "sequence"),
                         f"{self.name}, evaluation, single-step against whole-sequence", self.rtol, self.atol)

    def test_declared_step_modes_are_honoured(self, contract_registry: Registry, contract_info: ComponentInfo) -> None:
        """The step modes the registry has (what the matrix pairs trainers by) are the module's own,
        and a module that cannot run one step at a time refuses a single step with an error
        instead of computing something."""
        module = self.build(contract_registry)[0]
        own = frozenset(getattr(module, "step_modes", {"single", "sequence"}))
        assert own == contract_info.step_modes, (f"{self.name}: registered with step modes {sorted(contract_info.step_modes)} "
                                        f"but the module declares {sorted(own)}")
        if "single" in contract_info.step_modes:
            return
        net = self.build(contract_registry).train()
        x, _ = self.inputs("image")
        for m in net.modules():  # past set_step_mode, which would refuse before the module is asked
            if isinstance(m, SequenceModule):
                m.step_mode = "single"
        begin_sequence(net, self.time_steps)
        with pytest.raises(Exception) as refused:  # noqa: PT011 - any clear error will do
            net(x[0])
        assert not isinstance(refused.value, AssertionError) and str(refused.value), (
            f"{self.name}: declares {sorted(contract_info.step_modes)} only, and must refuse a single step with a message")

    def test_evaluation_does_not_depend_on_the_batch(self, contract_registry: Registry, contract_info: ComponentInfo) -> None:
        """After training, a sample's evaluation output is the same alone as in a batch (running
        statistics, not the test batch's), unless the module declares ``batch_dependent_eval``."""
        net = self.build(contract_registry)
        if getattr(net[0], "batch_dependent_eval", False):
            pytest.skip(f"{self.name} declares batch_dependent_eval = True")
        for mode in self.modes(contract_info):
            net = self.build(contract_registry)
            for seq in range(2):
                train_sequence(net, *self.inputs("image", seed=seq), mode)
            x, _ = self.inputs("image", seed=7)
            with torch.no_grad():
                net.eval()
                batch, alone = run_sequence(net, x, mode), run_sequence(net, x[:, :1], mode)
            assert_close(alone, batch[:, :1], f"{self.name} ({mode} mode): evaluation of sample 1 alone against in its "
                         "batch (declare batch_dependent_eval = True if this is intended)", self.rtol, self.atol)

    def test_state_dict_round_trip(self, contract_registry: Registry, contract_info: ComponentInfo) -> None:
        """What a checkpoint holds is the whole state: a fresh module loaded with a trained one's
        ``state_dict`` evaluates the same and takes the same next training step (outputs,
        gradients, buffers) -- state outside parameters and buffers breaks exact resume."""
        mode = self.modes(contract_info)[-1]
        trained = self.build(contract_registry, seed=0)
        for seq in range(2):
            train_sequence(trained, *self.inputs("image", seed=seq), mode)
        fresh = self.build(contract_registry, seed=3)
        fresh.load_state_dict(copy.deepcopy(trained.state_dict()))
        x, g = self.inputs("image", seed=9)
        with torch.no_grad():
            assert_close(run_sequence(fresh.eval(), x, mode), run_sequence(trained.eval(), x, mode),
                         f"{self.name} ({mode} mode): evaluation after load_state_dict", self.rtol, self.atol)
        a, b = train_sequence(fresh, x, g, mode), train_sequence(trained, x, g, mode)
        where = f"{self.name} ({mode} mode): the training step after load_state_dict"
        assert_close(a["y"], b["y"], f"{where}, outputs", self.rtol, self.atol)
        assert_close(a["gx"], b["gx"], f"{where}, input gradients", self.rtol, self.atol)
        for pname, ga, gb in zip(a["names"], a["gp"], b["gp"], strict=True):
            assert_close(ga, gb, f"{where}, gradient of {pname}", self.rtol, self.atol)
        for key in b["buffers"]:
            assert_close(a["buffers"][key], b["buffers"][key], f"{where}, buffer {key}", self.rtol, self.atol)

    def test_to_another_dtype_and_device(self, contract_registry: Registry, contract_info: ComponentInfo) -> None:
        """``.to(torch.float64)`` moves every parameter and buffer (output float64, the float32
        numbers up to rounding); ``.to(device)`` -- CUDA when there is one, else ``meta``, which
        refuses any tensor the module makes on the CPU -- runs training and evaluation there."""
        mode = self.modes(contract_info)[-1]
        x, g = self.inputs("image")
        ref = self.build(contract_registry)
        wide = copy.deepcopy(ref).to(torch.float64)
        for key, t in [*wide.named_parameters(), *wide.named_buffers()]:
            assert not t.is_floating_point() or t.dtype == torch.float64, f"{self.name}: {key} is {t.dtype} after .to(float64)"
        a, b = train_sequence(ref, x, g, mode), train_sequence(wide, x.double(), g.double(), mode)
        assert b["y"].dtype == torch.float64, f"{self.name}: float64 input and module give {b['y'].dtype}"
        assert_close(b["y"].float(), a["y"], f"{self.name} ({mode} mode): float64 against float32 outputs", 1e-4, 1e-4)
        device = other_device()
        moved = copy.deepcopy(ref).to(device)
        try:
            out = train_sequence(moved, x.to(device), g.to(device), mode)
            with torch.no_grad():
                y_eval = run_sequence(moved.eval(), x.to(device), mode)
        except (RuntimeError, NotImplementedError) as exc:
            pytest.fail(f"{self.name} ({mode} mode) on {device}: {type(exc).__name__}: {exc}")
        assert out["y"].device.type == device.type and y_eval.device.type == device.type
        if device.type == "cuda":
            assert_close(out["y"].cpu(), a["y"], f"{self.name}: CUDA against CPU outputs", 1e-4, 1e-4)

    def test_constant_input_gives_finite_output(self, contract_registry: Registry, contract_info: ComponentInfo) -> None:
        """A channel with zero variance (a constant input: silent or saturated layers) gives finite
        outputs and gradients, in training and evaluation."""
        x = torch.full((self.time_steps, self.batch, self.num_features, *self.spatial), 0.75)
        g = torch.ones_like(x)
        for mode in self.modes(contract_info):
            net = self.build(contract_registry)
            out = train_sequence(net, x, g, mode)
            assert_finite(out["y"], f"{self.name} ({mode} mode), constant input, training output")
            assert_finite(out["gx"], f"{self.name} ({mode} mode), constant input, input gradient")
            for pname, gp in zip(out["names"], out["gp"], strict=True):
                assert_finite(gp, f"{self.name} ({mode} mode), constant input, gradient of {pname}")
            with torch.no_grad():
                assert_finite(run_sequence(net.eval(), x, mode), f"{self.name} ({mode} mode), constant input, evaluation")

    def test_synchronized_statistics(self, contract_registry: Registry, contract_info: ComponentInfo, harness_gloo: Any) -> None:
        """Under ``torch.distributed`` (two gloo processes on the CPU, 5 and 3 samples of a batch
        of 8), a module declaring ``synchronized_statistics`` gives what one process gives on the
        union batch: outputs, input gradients, summed parameter gradients, identical buffers."""
        module = self.build(contract_registry)[0]
        mode = self.modes(contract_info)[-1]
        if not getattr(module, "synchronized_statistics", False):
            x, g = self.inputs("image")
            batch, alone = train_sequence(self.build(contract_registry), x, g, mode), \
                train_sequence(self.build(contract_registry), x[:, :1], g[:, :1], mode)
            if torch.allclose(batch["y"][:, :1], alone["y"], rtol=self.rtol, atol=self.atol):
                pytest.skip(f"{self.name} takes no batch statistics (a sample's training output does not depend on "
                            "the rest of its batch): nothing to synchronize")
            pytest.skip(f"{self.name} takes batch statistics but does not declare synchronized_statistics = True: under "
                        "torchrun they are each process's own (docs/plugins.md, 'Synchronized statistics')")
        batch, split = 8, 5
        sequences = [self.inputs("image", seed=s, batch=batch) for s in range(2)]
        ref_net = self.build(contract_registry)
        ref = [train_sequence(ref_net, x, g, mode) for x, g in sequences]
        ranks = harness_gloo.run(_sync_share, portable_plugins(self.plugins), self.uses_autoload(), self.name, dict(self.options),
                                 self.num_features, self.time_steps, self.v_threshold, mode, sequences, split)
        names = ref[0]["names"]
        for seq, (r, r0, r1) in enumerate(zip(ref, ranks[0], ranks[1], strict=True)):
            where = f"{self.name} ({mode} mode), sequence {seq + 1}, two processes against one on the union batch"
            assert_close(torch.cat([r0["y"], r1["y"]], 1), r["y"], f"{where}: outputs", self.rtol, self.atol)
            assert_close(torch.cat([r0["gx"], r1["gx"]], 1), r["gx"], f"{where}: input gradients", self.rtol, self.atol)
            for pname, g0, g1, gr in zip(names, r0["gp"], r1["gp"], r["gp"], strict=True):
                if gr is not None:
                    assert_close(g0 + g1, gr, f"{where}: summed gradient of {pname}", self.rtol, self.atol)
            for key, value in r["buffers"].items():
                assert_close(r0["buffers"][key], value, f"{where}: buffer {key}", self.rtol, self.atol)
                assert torch.equal(r0["buffers"][key], r1["buffers"][key]), f"{where}: buffer {key} differs between processes"


__all__ = ["NormalizerContract", "build_normalizer", "buffers", "train_sequence"]

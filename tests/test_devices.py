"""Device choice, process-group backend, CUDA random states and backend flags, checked on a CPU
machine with CUDA's queries stubbed (what matters is what the harness asks for and says)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from cell_support import tiny_cell
from harness import checkpoint, devices, parallel
from harness.config import CellConfig, Component, cell_id, config_id
from harness.errors import HarnessError


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("setting", ["auto", "cuda", "cuda:0", "cuda:1"])
def test_under_data_parallelism_every_cuda_setting_is_the_process_own_gpu(two_gpus, setting):
    assert devices.resolve_device(setting, rank=3, world_size=4, local_rank=1) == torch.device("cuda", 1)
    assert devices.resolve_device(setting, rank=2, world_size=4, local_rank=0) == torch.device("cuda", 0)


def test_a_cpu_setting_stays_on_the_cpu_under_data_parallelism(two_gpus):
    assert devices.resolve_device("cpu", rank=1, world_size=2, local_rank=1) == torch.device("cpu")


def test_a_process_without_a_gpu_of_its_own_is_refused_with_what_to_do(two_gpus):
    with pytest.raises(HarnessError, match=r"process 2 of 3 has local rank 2, but its node has 2 visible GPU\(s\): "
                                           r"start at most 2 process\(es\) per node \(torchrun --nproc_per_node=2\)"):
        devices.resolve_device("cuda", rank=2, world_size=3, local_rank=2)
    with pytest.raises(HarnessError, match=r"process 1 of 2 does not know its GPU: LOCAL_RANK is not set"):
        devices.resolve_device("auto", rank=1, world_size=2, local_rank=None)


def test_one_process_gets_the_gpu_it_names_if_it_exists(two_gpus):
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(HarnessError, match=r"device 'cuda:5' requested but only 2 GPU\(s\) are visible \(cuda:0..cuda:1\)"):
        devices.resolve_device("cuda:5")


def test_without_cuda_a_cuda_device_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert devices.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(HarnessError, match=r"device 'cuda:7' requested but CUDA is not available"):
        devices.resolve_device("cuda:7")
    with pytest.raises(HarnessError, match=r"device 'gpu0' is not a device PyTorch knows"):
        devices.resolve_device("gpu0")


def test_the_process_group_has_gloo_for_cpu_tensors_and_nccl_for_cuda_tensors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parallel.backend_for_this_machine() == "cpu:gloo,cuda:nccl"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parallel.backend_for_this_machine() == "gloo"


def test_the_local_rank_is_never_guessed_from_the_global_rank(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 5)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 8)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert parallel.current() == parallel.Parallel(5, 8, None)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert parallel.current() == parallel.Parallel(5, 8, 1)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("LOCAL_RANK")
    assert parallel.from_environment() == parallel.Parallel(1, 2, None)


class _CudaRng:
    """Stands in for CUDA's random state API: ``visible`` GPUs, records what is restored."""

    def __init__(self, monkeypatch, visible: int) -> None:
        self.restored: dict[int, torch.Tensor] = {}
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: self.restored.__setitem__(device, state))
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("would raise for states that do not fit"))


def _state_with_cuda(n: int) -> dict:
    monkey_free = torch.Generator()
    state = checkpoint.rng_state(monkey_free)
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(n)]
    return state


def test_a_checkpoint_from_a_machine_with_more_gpus_restores_the_states_that_fit_and_says_so(monkeypatch):
    state = _state_with_cuda(8)
    rng = _CudaRng(monkeypatch, visible=2)
    warnings = checkpoint.set_rng_state(state, torch.Generator())
    assert sorted(rng.restored) == [0, 1] and torch.equal(rng.restored[1], state["cuda"][1])
    (warning,) = warnings
    assert "CUDA random states of 8 GPU(s) and 2 are visible now: restored those of cuda:0..cuda:1" in warning


def test_a_checkpoint_from_a_machine_with_fewer_gpus_restores_those_it_has(monkeypatch):
    state = _state_with_cuda(1)
    rng = _CudaRng(monkeypatch, visible=4)
    (warning,) = checkpoint.set_rng_state(state, torch.Generator())
    assert sorted(rng.restored) == [0] and "restored those of cuda:0..cuda:0, the other GPUs keep their own" in warning


def test_a_checkpoint_with_as_many_gpus_restores_all_silently(monkeypatch):
    rng = _CudaRng(monkeypatch, visible=2)
    assert checkpoint.set_rng_state(_state_with_cuda(2), torch.Generator()) == []
    assert sorted(rng.restored) == [0, 1]


def _tf32_values() -> list:
    return [getattr(obj, attr) for obj, attr in devices._tf32_flags()]


def test_deterministic_sets_the_flags_for_the_cell_and_restores_them_after():
    cudnn = torch.backends.cudnn
    before = (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled(), _tf32_values())
    with devices.backend_settings(deterministic=True, cudnn_benchmark=True):
        assert torch.are_deterministic_algorithms_enabled() and cudnn.deterministic and not cudnn.benchmark
        assert all(v in ("ieee", False) for v in _tf32_values())  # no TF32 anywhere
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled(), _tf32_values()) == before
    with devices.backend_settings(deterministic=False, cudnn_benchmark=True):
        assert cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    assert cudnn.benchmark == before[0]


def test_the_backend_settings_of_a_failing_cell_do_not_leak_into_the_next():
    with pytest.raises(RuntimeError, match="boom"):
        with devices.backend_settings(deterministic=True, cudnn_benchmark=False):
            raise RuntimeError("boom")
    assert not torch.are_deterministic_algorithms_enabled()


def test_the_new_settings_are_params_but_leave_existing_cell_ids_unchanged():
    from harness.config import flatten

    cfg = CellConfig(dataset=Component("digits", {"test_fraction": 0.2, "split_seed": 0}),
                     model=Component("vgg_small", {"channels": [4, 8]}), normalizer=Component("osr", {}),
                     trainer=Component("online", {}), epochs=5, batch_size=64, time_steps=4)
    # The ids this configuration had before `precision`, `deterministic` and `cudnn_benchmark`
    # existed: finished runs and checkpoints of earlier versions are still found.
    assert (cell_id(cfg), config_id(cfg)) == ("ae5d63c68437", "a790269a1778")
    flat = flatten(cfg)
    assert (flat["precision"], flat["deterministic"], flat["cudnn_benchmark"]) == ("float32", False, True)  # logged
    assert flat["compile"] is False
    for change in ({"deterministic": True}, {"precision": "bfloat16"}, {"cudnn_benchmark": False}, {"compile": True}):
        assert cell_id(dataclasses.replace(cfg, **change)) != cell_id(cfg), change  # they change results: new cells


def test_a_compiled_cell_compiles_its_model_in_place_and_trains(registry, monkeypatch):
    from cell_support import Recorder
    from harness.runner import run_cell

    compiled = []
    real = torch.nn.Module.compile

    def compile_quickly(self, *args, **kwargs):  # the eager backend: the same wiring, without minutes of C++
        compiled.append((type(self).__name__, kwargs))
        return real(self, backend="eager", dynamic=kwargs.get("dynamic"))

    monkeypatch.setattr(torch.nn.Module, "compile", compile_quickly)
    plain = run_cell(tiny_cell(0, max_train_batches=2, max_eval_batches=1), registry, Recorder())
    result = run_cell(tiny_cell(0, max_train_batches=2, max_eval_batches=1, compile=True), registry, Recorder())
    assert result.status == "finished", result.error
    assert compiled == [("SpikingSequential", {"dynamic": False})]
    torch.testing.assert_close(result.metrics["train_loss"], plain.metrics["train_loss"], rtol=1e-5, atol=1e-6)


def test_a_deterministic_cell_runs_with_deterministic_algorithms(registry):
    from cell_support import Recorder
    from harness.runner import run_cell

    seen = []

    class Probe(Recorder):
        def on_epoch_start(self, **kw):
            seen.append(torch.are_deterministic_algorithms_enabled())

    cell = tiny_cell(0, max_train_batches=1, max_eval_batches=1, deterministic=True)
    assert run_cell(cell, registry, Probe()).status == "finished"
    assert seen == [True] and not torch.are_deterministic_algorithms_enabled()


def test_global_average_pooling_is_adaptive_pooling_bit_for_bit_and_saves_nothing():
    from harness.meters.memory import SavedTensorMeter
    from harness.snn import GlobalAvgPool

    torch.manual_seed(0)
    for shape in [(16, 8, 7, 7), (4, 32, 2, 2), (6, 5, 3, 3), (2, 4, 1, 1)]:
        x = torch.randn(*shape, requires_grad=True)
        g = torch.randn(shape[:2])
        reference = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())(x)
        with SavedTensorMeter() as meter:
            y = GlobalAvgPool()(x)
        assert torch.equal(y, reference) and meter.peak_bytes == 0
        assert torch.equal(*(torch.autograd.grad(out, x, g)[0] for out in (y, reference)))


def test_the_deterministic_cross_entropy_is_cross_entropy(monkeypatch):
    import torch.nn.functional as F

    from snn_harness_plugins.losses import cross_entropy

    torch.manual_seed(0)
    logits, target = torch.randn(16, 10, requires_grad=True), torch.randint(0, 10, (16,))
    reference = F.cross_entropy(logits, target)
    assert torch.equal(cross_entropy(logits, target), reference)  # the CPU path is F.cross_entropy itself
    # The CUDA-under-deterministic-algorithms formulation, evaluated here on the CPU:
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with devices.backend_settings(deterministic=True, cudnn_benchmark=False):
        deterministic = cross_entropy(logits, target)
    monkeypatch.undo()
    torch.testing.assert_close(deterministic, reference, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.autograd.grad(deterministic, logits)[0], torch.autograd.grad(reference, logits)[0])

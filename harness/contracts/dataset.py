"""The data-set contract: what a factory registered through ``register_datasets`` must do.

Subclass :class:`DatasetContract` with ``name = "my_data"`` and override :meth:`present` to write
a tiny copy of the data set in its own on-disk format under ``tmp_path`` (and return the options
that point at it); :meth:`absent` gives options that point at nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from harness.contracts._common import Contract
from harness.data import DatasetBundle
from harness.errors import DatasetNotFoundError
from harness.registry import Registry


class DatasetContract(Contract):
    """The clauses every data set must pass. Set ``name``; override :meth:`present` (and
    :meth:`absent` when the files are not found through a ``root`` option)."""

    kind = "dataset"
    time_steps: ClassVar[int] = 4
    needs_files: ClassVar[bool] = True  # False for data that ships with a package (nothing can be missing)

    def present(self, tmp_path: Path) -> dict[str, Any]:
        """Options under which the data set loads (default: ``options``)."""
        return dict(self.options)

    def absent(self, tmp_path: Path) -> dict[str, Any]:
        """Options under which its files cannot be found: ``root`` an empty folder, downloads off."""
        return {**self.options, "root": str(tmp_path / "absent")}

    def load(self, registry: Registry, options: dict[str, Any]) -> DatasetBundle:
        info = registry.datasets.info(self.name)
        extra = {"time_steps": self.time_steps} if info.takes("time_steps") else {}
        if "download" in info.options:
            options = {"download": False, **options}
        return info.factory(**extra, **options)

    def test_missing_files_raise_the_documented_error(self, contract_registry: Registry, tmp_path: Path) -> None:
        """Files that are not there raise :class:`harness.DatasetNotFoundError` (not a bare
        ``FileNotFoundError``, never a download the user did not ask for), naming where it looked."""
        if not self.needs_files:
            pytest.skip(f"{self.name} reads no files of the user's")
        options = self.absent(tmp_path)
        with pytest.raises(Exception) as raised:  # noqa: PT011 - which one is the clause
            self.load(contract_registry, options)
        exc = raised.value
        assert isinstance(exc, DatasetNotFoundError), (
            f"{self.name}: missing files raised {type(exc).__name__}: {exc}; raise harness.DatasetNotFoundError "
            "naming the expected files and how to get them")
        where = str(options.get("root", ""))
        assert not where or where in str(exc), f"{self.name}: the error does not say where it looked ({where}): {exc}"

    def test_samples_have_the_declared_shape(self, contract_registry: Registry, tmp_path: Path) -> None:
        """Train and test samples are float tensors ``[C, H, W]`` (``[F, C, H, W]`` with ``F <= T``
        frames for a temporal data set) of the declared ``in_channels`` and ``input_size``, with
        integer labels in ``0..num_classes-1``."""
        bundle = self.load(contract_registry, self.present(tmp_path))
        expected = (bundle.in_channels, *bundle.input_size)
        for split, data in (("train", bundle.train), ("test", bundle.test)):
            assert len(data) > 0, f"{self.name}: the {split} set is empty"
            x, y = data[0]
            assert isinstance(x, torch.Tensor) and x.is_floating_point(), f"{self.name} ({split}): a sample is {type(x).__name__}"
            shape = tuple(x.shape)
            if bundle.temporal:
                assert len(shape) == 4 and shape[1:] == expected and 1 <= shape[0] <= self.time_steps, (
                    f"{self.name} ({split}): a sample is {shape}; declared [F <= {self.time_steps}, {', '.join(map(str, expected))}]")
            else:
                assert shape == expected, f"{self.name} ({split}): a sample is {shape}; declared {expected}"
            label = int(y)
            assert 0 <= label < bundle.num_classes, f"{self.name} ({split}): label {label} outside 0..{bundle.num_classes - 1}"

    def test_listed_files_exist(self, contract_registry: Registry, tmp_path: Path) -> None:
        """The files the bundle lists (whose checksum a run records) exist."""
        bundle = self.load(contract_registry, self.present(tmp_path))
        missing = [str(p) for p in bundle.files if not Path(p).exists()]
        assert not missing, f"{self.name}: lists files that do not exist: {', '.join(missing)}"


__all__ = ["DatasetContract"]

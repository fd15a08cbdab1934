"""TorchScript export: scripted where possible, traced and checked where not, and quiet about deprecation."""

from __future__ import annotations

import warnings

import pytest
import torch
from digits.export import ExportError
from digits.export.torchscript import export_torchscript, load_torchscript
from torch import nn


class _Unscriptable(nn.Module):
    """TorchScript compiles no lambdas; tracing records what they compute."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = lambda t: t * 2  # noqa: E731  the construct under test
        return double(self.fc(torch.flatten(x, 1)))


class _BatchDependent(_Unscriptable):
    """Python control flow on the batch size: a trace bakes in the example's branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y if x.shape[0] > 1 else -y


def test_a_model_that_cannot_be_scripted_is_traced_and_works_at_other_batch_sizes(tmp_path):
    model, messages = _Unscriptable().eval(), []
    export_torchscript(model, tmp_path / "model.pt", torch.randn(2, 1, 28, 28), log=messages.append)
    assert "tracing _Unscriptable instead" in messages[0]
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(load_torchscript(tmp_path / "model.pt")(x), model(x))


def test_a_trace_that_depends_on_the_example_is_refused(tmp_path):
    with pytest.raises(ExportError, match="traces inconsistently"), pytest.warns(torch.jit.TracerWarning):
        export_torchscript(_BatchDependent().eval(), tmp_path / "model.pt", torch.randn(2, 1, 28, 28), log=print)
    assert not (tmp_path / "model.pt").exists()


def test_torchscript_deprecation_warnings_stay_out_of_users_faces(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_torchscript(
            nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval(), tmp_path / "m.pt", torch.randn(2, 1, 28, 28)
        )
        load_torchscript(tmp_path / "m.pt")
        warnings.warn("an unrelated FutureWarning still shows", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["an unrelated FutureWarning still shows"]


def test_a_file_that_is_not_torchscript(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"not a zip archive")
    with pytest.raises(ExportError, match="is not a loadable TorchScript file"):
        load_torchscript(tmp_path / "model.pt")

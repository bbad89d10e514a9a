"""Per-sample curvature: the vectorised path equals the per-sample loop; MC Fisher and Hutchinson average to
the analytic curvature of a linear softmax model."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from fairdeploy.errors import FairdeployError
from fairdeploy.pruning._reference import group_curvature_loop
from fairdeploy.pruning.curvature import group_curvature, group_gradient

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.ReLU(),  # grouped, strided: 16 positions
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(inplace=True),  # depthwise
        nn.Conv2d(8, 8, 2, stride=2),  # 4 output positions: the position-pair path
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 6), nn.ReLU(inplace=True), nn.Linear(6, 3),
    )
    with torch.no_grad():  # eval-mode BN with non-trivial statistics
        m[1].running_mean.normal_()
        m[1].running_var.uniform_(0.5, 2.0)
    return m


def _batches(n: int, size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[: n // 2], y[: n // 2]), (x[n // 2:], y[n // 2:])]


def _assert_close(fast: dict[str, torch.Tensor], loop: dict[str, torch.Tensor]) -> None:
    assert fast.keys() == loop.keys()
    for k in fast:
        assert fast[k].shape == loop[k].shape
        scale = float(loop[k].abs().max())
        assert scale > 0, k  # the comparison would be empty otherwise
        torch.testing.assert_close(fast[k], loop[k], rtol=1e-4, atol=1e-5 * scale, msg=k)


@pytest.mark.parametrize("estimator", ["empirical", "fisher", "hutchinson"])
def test_fast_path_equals_per_sample_loop_on_tiny_model(estimator: str) -> None:
    model = _tiny_model()
    data = _batches(10, 8)
    kwargs = dict(mc_samples=3, probes=2, seed=1)
    fast = group_curvature(model, data, estimator, "cpu", max_chunk_elements=200, **kwargs)  # many chunks
    loop = group_curvature_loop(model, data, estimator, "cpu", **kwargs)
    _assert_close(fast, loop)
    assert model.training  # the caller's mode is restored
    if estimator != "hutchinson":
        assert all(bool((v >= 0).all()) for v in fast.values())


def test_fast_path_equals_loop_on_resnet18_layers() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    # stem (256 positions), layer3 (4 positions), layer4 (1 position, closed form), the head (linear)
    layers = ["conv1", "layer1.0.conv2", "layer3.0.conv1", "layer3.0.downsample.0", "layer4.1.conv2", "fc"]
    data = _batches(6, 32, seed=3)
    fast = group_curvature(model, data, "fisher", "cpu", layers=layers, seed=2)
    loop = group_curvature_loop(model, data, "fisher", "cpu", layers=layers, seed=2)
    assert set(fast) == {f"{n}.weight" for n in layers}
    _assert_close(fast, loop)


def test_empirical_fisher_is_not_the_squared_mean_gradient() -> None:
    model = _tiny_model().eval()
    data = _batches(10, 8)
    emp = group_curvature(model, data, "empirical", "cpu")
    mean_g = group_gradient(model, data, "cpu")
    k = "12.weight"
    # Jensen: the mean of squares is at least the square of the mean, and strictly larger here
    assert bool((emp[k] >= mean_g[k].square() - 1e-7).all())
    assert float((emp[k] - mean_g[k].square()).sum()) > 1e-4


def _linear_softmax(d: int = 4, k: int = 3) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, k, bias=False))
    x = torch.randn(5, d)
    return model, x


def _analytic_diag(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GGN (= Hessian) diagonal of the mean cross-entropy of a linear softmax model: mean_i p_ik(1-p_ik) x_ij^2."""
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    return ((p * (1 - p))[:, :, None] * x.square()[:, None, :]).mean(0)


def test_mc_fisher_averages_to_the_analytic_ggn_diagonal() -> None:
    model, x = _linear_softmax()
    expected = _analytic_diag(model, x)
    reps = 4000  # each input repeated: 4000 independent softmax draws per input
    xs = x.repeat(reps, 1)
    data = [(xs, torch.zeros(len(xs), dtype=torch.long))]  # labels are not used by MC Fisher
    got = group_curvature(model, data, "fisher", "cpu", batch_size=len(xs), seed=0)["1.weight"]
    torch.testing.assert_close(got, expected, rtol=0.06, atol=0.01 * float(expected.max()))
    # the empirical Fisher with fixed labels is a different (biased) quantity
    emp = group_curvature(model, [(x, torch.zeros(5, dtype=torch.long))], "empirical", "cpu")["1.weight"]
    assert float((emp - expected).abs().max()) > 0.1 * float(expected.max())


def test_hutchinson_averages_to_the_hessian_diagonal() -> None:
    model, x = _linear_softmax()
    y = torch.tensor([0, 1, 2, 0, 1])
    expected = _analytic_diag(model, x)
    got = group_curvature(model, [(x, y)], "hutchinson", "cpu", probes=3000, seed=0)["1.weight"]
    torch.testing.assert_close(got, expected, rtol=0.15, atol=0.05 * float(expected.max()))


def test_bad_estimator_and_layer_are_user_errors() -> None:
    model, x = _linear_softmax()
    data = [(x, torch.zeros(5, dtype=torch.long))]
    with pytest.raises(FairdeployError, match="unknown curvature estimator 'newton'; choose one of fisher"):
        group_curvature(model, data, "newton")
    with pytest.raises(FairdeployError, match="layer '0' is not a Conv2d or Linear"):
        group_curvature(model, data, "fisher", layers=["0"])


def test_an_input_modified_in_place_is_refused_not_silently_wrong() -> None:
    class InPlaceAfter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x * 1.0
            out = self.fc(x)
            x.mul_(2.0)  # the layer's input changes after the layer ran
            return out + x[:, :3]

    model = InPlaceAfter()
    data = [(torch.randn(5, 4), torch.zeros(5, dtype=torch.long))]
    with pytest.raises(FairdeployError, match="input of layer 'fc' is modified in place"):
        group_curvature(model, data, "empirical")

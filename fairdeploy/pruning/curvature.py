"""Per-sample curvature (MC Fisher, empirical Fisher, Hutchinson) of conv/linear weights.

Fisher and empirical Fisher: the mean over samples of the *squared per-sample* gradient (never the square
of a batch-mean gradient). The fast path takes one forward/backward per batch, captures every layer's input
and output gradient, and forms the per-sample squares in closed form (linear layers, and conv layers whose
output is 1x1: (grad_out^2)^T @ input^2, no per-sample tensor) or from the unfolded input with one einsum
per chunk of samples (other conv layers; chunks bound the memory). Hutchinson: E[v * Hv], Rademacher v,
Hessian-vector products by double backward of the batch loss (vectorised over the batch by linearity).

One driver, `group_curvature`, walks the batches, draws each batch's random targets / probes and averages the
sums; what it adds per batch is a `BatchSums`: `VectorisedSums` (the fast path above) or
`fairdeploy.pruning._reference.per_sample_loop`, which forms the same terms one sample at a time with plain autograd
(the tests' oracle, `_reference.group_curvature_loop`).
BatchNorm and dropout are in eval mode throughout (per-sample gradients are only defined then).

The random targets / probes of batch b come from a generator seeded by (seed, b), so a batch's terms do not
depend on which process computes it: under torchrun each rank takes every R-th batch, accumulates per-sample
sums in float64 and the sums and counts are added over ranks with all_reduce (every rank gets the same
curvature, equal to one process's up to float64 rounding of the order of the batch sums).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fairdeploy.data.batches import BatchSource, rank_batches
from fairdeploy.distributed import all_reduce_sum
from fairdeploy.errors import FairdeployError
from fairdeploy.progress import Progress, no_progress

ESTIMATORS = ("fisher", "empirical", "hutchinson")
DEFAULT_ESTIMATOR = "fisher"
# the batch of a direct group_curvature / group_gradient call (the pruning methods pass their score batch,
# scoresets.DEFAULT_SCORE_BATCH_SIZE)
DEFAULT_CURVATURE_BATCH_SIZE = 64
DEFAULT_MAX_CHUNK_ELEMENTS = 1 << 25  # per-sample gradient + unfolded input floats held at once (128 MiB fp32)
GRAM_MAX_POSITIONS = 4  # conv outputs with at most this many positions use the position-pair matmul


def _check(model: nn.Module, estimator: str, layers: Sequence[str] | None) -> list[str]:
    if estimator not in ESTIMATORS:
        raise FairdeployError(f"unknown curvature estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    modules = dict(model.named_modules())
    if layers is None:
        layers = [n for n, m in modules.items() if n and isinstance(m, (nn.Conv2d, nn.Linear))]
    layers = list(layers)
    if not layers:
        raise FairdeployError("no conv or linear layer to compute curvature for")
    for name in layers:
        m = modules.get(name)
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            raise FairdeployError(f"layer {name!r} is not a Conv2d or Linear module of the model")
        if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
            raise FairdeployError(f"layer {name!r}: only zero padding given as integers is supported")
    return layers


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was = [m.training for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, t in zip(model.modules(), was):
            m.training = t


def _targets(logits: torch.Tensor, y: torch.Tensor, estimator: str, mc_samples: int,
             generator: torch.Generator) -> torch.Tensor:
    """(B, S) class targets: the true label (empirical), or S draws from the model's softmax (fisher)."""
    if estimator == "empirical":
        return y[:, None]
    probs = torch.softmax(logits.detach().double(), dim=1).cpu()
    return torch.multinomial(probs, mc_samples, replacement=True, generator=generator).to(y.device)


def batch_generator(seed: int, batch: int) -> torch.Generator:
    """The generator of batch `batch`'s random draws (targets, probes): independent of the process."""
    return torch.Generator().manual_seed(seed * 1_000_003 + batch)


def _reduced_mean(acc: dict[str, torch.Tensor], n_seen: int, what: str) -> dict[str, torch.Tensor]:
    """Sum the per-rank float64 sums and counts over ranks; the float32 mean on the CPU."""
    n = int(all_reduce_sum(torch.tensor([n_seen], dtype=torch.float64))[0])
    if n == 0:
        raise FairdeployError(f"no samples to compute {what} from (empty score set)")
    return {f"{k}.weight": (all_reduce_sum(a) / n).float().cpu() for k, a in acc.items()}


def _rademacher(shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.randint(0, 2, tuple(shape), generator=generator).float() * 2 - 1).to(device)


@dataclass(frozen=True)
class BatchDraws:
    """One batch's random draws, all from the batch's own generator (batch_generator): the targets of the Fisher
    estimators, or the Rademacher probes of Hutchinson, in the order they are asked for."""

    estimator: str
    mc_samples: int
    probes: int
    generator: torch.Generator
    device: torch.device

    def targets(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, S) class targets: the true label (empirical), or mc_samples draws from the softmax (fisher)."""
        return _targets(logits, y, self.estimator, self.mc_samples, self.generator)

    def probe(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One Rademacher vector per parameter."""
        return [_rademacher(w.shape, self.generator, self.device) for w in params]


class BatchSums(Protocol):
    """Adds one batch's per-sample curvature terms, summed over its samples, into `acc` (float64, one tensor of the
    weight's shape per layer): squared per-sample gradients averaged over the targets (fisher, empirical), or
    v * Hv averaged over the probes (hutchinson). Runs in eval mode with gradients enabled."""

    def __call__(self, model: nn.Module, layers: Sequence[str], acc: dict[str, torch.Tensor], x: torch.Tensor,
                 y: torch.Tensor, draws: BatchDraws) -> None: ...


# ----------------------------------------------------------------------------------------------------------
# fast path
# ----------------------------------------------------------------------------------------------------------

class _Capture:
    """Forward hooks saving each layer's input and output (the output is cloned for the next op, so an
    in-place activation after the layer cannot change the tensor whose gradient we take)."""

    def __init__(self, modules: dict[str, nn.Module], layers: Sequence[str]):
        self.inputs: dict[str, torch.Tensor] = {}
        self.versions: dict[str, int] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        for name in layers:
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            if name in self.outputs:
                raise FairdeployError(
                    f"layer {name!r} runs more than once per forward pass; per-sample curvature needs each "
                    "layer used once"
                )
            self.inputs[name] = inputs[0].detach()  # shares the version counter: in-place edits are detected
            self.versions[name] = inputs[0]._version
            self.outputs[name] = output
            return output.clone()
        return hook

    def input(self, name: str) -> torch.Tensor:
        x = self.inputs[name]
        if x._version != self.versions[name]:
            raise FairdeployError(
                f"the input of layer {name!r} is modified in place later in the forward pass; per-sample "
                "curvature cannot use it"
            )
        return x

    def clear(self) -> None:
        self.inputs.clear()
        self.versions.clear()
        self.outputs.clear()

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _linear_sq(x: torch.Tensor, go: torch.Tensor, max_elements: int) -> torch.Tensor:
    """sum_b (per-sample dL_b/dW)^2 for a Linear layer."""
    if x.dim() == 2:
        return (go.square()).t() @ x.square()
    x3, g3 = x.reshape(x.shape[0], -1, x.shape[-1]), go.reshape(go.shape[0], -1, go.shape[-1])
    out = torch.zeros(g3.shape[-1], x3.shape[-1], device=x.device, dtype=x.dtype)
    per = g3.shape[-1] * x3.shape[-1] + x3[0].numel()
    chunk = max(1, max_elements // max(per, 1))
    for s in range(0, x3.shape[0], chunk):
        out += torch.einsum("bto,bti->boi", g3[s:s + chunk], x3[s:s + chunk]).square().sum(0)
    return out


def _unfold(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """F.unfold's (B, C*kh*kw, L) layout. Without dilation it is built from a strided view and one copy:
    the im2col kernel behind F.unfold is far slower on a CPU whose cores are shared."""
    if tuple(conv.dilation) != (1, 1):
        return F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    patches = x.unfold(2, kh, sh).unfold(3, kw, sw)  # (B, C, Ho, Wo, kh, kw), a view
    b, c, ho, wo = patches.shape[:4]
    return patches.permute(0, 1, 4, 5, 2, 3).reshape(b, c * kh * kw, ho * wo)


def _conv_per_sample(conv: nn.Conv2d, x: torch.Tensor, go: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfolded input (B, G, Cin/G*kh*kw, L) and output gradient (B, G, Cout/G, L) of a Conv2d."""
    b = x.shape[0]
    u = _unfold(x, conv)
    groups = conv.groups
    u = u.reshape(b, groups, -1, u.shape[-1])
    g = go.reshape(b, groups, conv.out_channels // groups, -1)
    if g.shape[-1] != u.shape[-1]:
        raise FairdeployError(f"conv layer {conv}: unfolded input does not match the output size")
    return u, g


def _conv_sq(conv: nn.Conv2d, x: torch.Tensor, go: torch.Tensor, max_elements: int) -> torch.Tensor:
    """sum_b (per-sample dL_b/dW)^2 for a Conv2d, in chunks of samples (closed form when the output is 1x1)."""
    groups, w = conv.groups, conv.weight
    per_sample = w.numel() + x[0].numel() * conv.kernel_size[0] * conv.kernel_size[1] + go[0].numel()
    chunk = max(1, max_elements // max(per_sample, 1))
    out = torch.zeros(groups, conv.out_channels // groups, w[0].numel(), device=x.device, dtype=x.dtype)
    for s in range(0, x.shape[0], chunk):
        u, g = _conv_per_sample(conv, x[s:s + chunk], go[s:s + chunk])
        positions = u.shape[-1]
        if positions == 1:  # one output position: the per-sample gradient is an outer product
            out += torch.einsum("bgo,bgi->goi", g[..., 0].square(), u[..., 0].square())
        elif positions <= GRAM_MAX_POSITIONS:
            # sum_b (sum_l g_bl u_bl^T)^2 = sum_{b,l,m} (g_bl * g_bm) (u_bl * u_bm)^T: one matmul over
            # (sample, position pair), no per-sample tensor; cheaper than one while positions are few.
            gg = torch.einsum("bgol,bgom->goblm", g, g).flatten(2)
            uu = torch.einsum("bgil,bgim->gblmi", u, u).flatten(1, 3)
            out += torch.bmm(gg, uu)
        else:
            per = torch.einsum("bgol,bgil->bgoi", g, u)
            out += per.square_().sum(0)
    return out.reshape(w.shape)


def _layer_sq(module: nn.Module, x: torch.Tensor, go: torch.Tensor, max_elements: int) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return _linear_sq(x, go, max_elements)
    return _conv_sq(module, x, go, max_elements)


@dataclass(frozen=True)
class VectorisedSums:
    """The fast path's BatchSums: one forward / backward per batch (per target draw), the per-sample squares in
    closed form from each layer's captured input and output gradient; Hutchinson by double backward of the batch
    loss (one probe serves every sample: v * Hv of the summed loss is the sum of the per-sample terms)."""

    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS

    def __call__(self, model: nn.Module, layers: Sequence[str], acc: dict[str, torch.Tensor], x: torch.Tensor,
                 y: torch.Tensor, draws: BatchDraws) -> None:
        with self.attached(model, layers, draws.estimator) as add:
            add(model, layers, acc, x, y, draws)

    @contextlib.contextmanager
    def attached(self, model: nn.Module, layers: Sequence[str], estimator: str) -> Iterator[BatchSums]:
        """This BatchSums with its per-call setup done once for the block (group_curvature's batches): the modules
        looked up and, for the per-sample estimators, the capture hooks registered until the block ends."""
        modules = dict(model.named_modules())
        cap = None if estimator == "hutchinson" else _Capture(modules, layers)

        def add(model: nn.Module, layers: Sequence[str], acc: dict[str, torch.Tensor], x: torch.Tensor,
                y: torch.Tensor, draws: BatchDraws) -> None:
            if cap is None:
                self._hutchinson(modules, model, layers, acc, x, y, draws)
                return
            try:
                self._per_sample(modules, cap, model, layers, acc, x, y, draws)
            finally:
                cap.clear()

        try:
            yield add
        finally:
            if cap is not None:
                cap.close()

    @staticmethod
    def _hutchinson(modules: dict[str, nn.Module], model: nn.Module, layers: Sequence[str],
                    acc: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, draws: BatchDraws) -> None:
        params = [modules[n].weight for n in layers]
        loss = F.cross_entropy(model(x).float(), y, reduction="sum")
        grads = torch.autograd.grad(loss, params, create_graph=True)
        for p in range(draws.probes):
            vs = draws.probe(params)
            hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=p < draws.probes - 1)
            for n, v, hv in zip(layers, vs, hvs):
                acc[n] += (v * hv).float() / draws.probes

    def _per_sample(self, modules: dict[str, nn.Module], cap: _Capture, model: nn.Module, layers: Sequence[str],
                    acc: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, draws: BatchDraws) -> None:
        logits = model(x).float()
        targets = draws.targets(logits, y)
        outs = [cap.outputs[n] for n in layers]
        for s in range(targets.shape[1]):
            loss = F.cross_entropy(logits, targets[:, s], reduction="sum")
            grads = torch.autograd.grad(loss, outs, retain_graph=s < targets.shape[1] - 1)
            for n, go in zip(layers, grads):
                sq = _layer_sq(modules[n], cap.input(n).float(), go.float(), self.max_chunk_elements)
                acc[n] += sq / targets.shape[1]


def group_curvature(
    model: nn.Module,
    data: BatchSource,
    estimator: str = DEFAULT_ESTIMATOR,
    device: str | torch.device = "cpu",
    *,
    layers: Sequence[str] | None = None,
    batch_size: int = DEFAULT_CURVATURE_BATCH_SIZE,
    mc_samples: int = 1,
    probes: int = 1,
    seed: int = 0,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
    workers: int = 0,
    progress: Progress = no_progress,
    task: str = "curvature",
    batch_sums: BatchSums | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal curvature of the mean per-sample loss over `data`, for the weights of `layers`.

    Returns {"<layer>.weight": tensor of the weight's shape} (float32, on the CPU), averaged over samples
    (and over `mc_samples` softmax draws per sample for `fisher`, `probes` Rademacher vectors per batch for
    `hutchinson`). `layers` defaults to every Conv2d and Linear module. Runs on `device`; no mixed precision.
    `batch_sums` forms each batch's terms (None: VectorisedSums(max_chunk_elements), the fast path).
    """
    dev = torch.device(device)
    layers = _check(model, estimator, layers)
    total = len(data) if hasattr(data, "__len__") else 0
    if mc_samples < 1 or probes < 1:
        raise FairdeployError(f"mc_samples and probes must be >= 1, got {mc_samples} and {probes}")
    # the fast path registers its hooks once for the whole call, not once per batch
    attached = (contextlib.nullcontext(batch_sums) if batch_sums is not None
                else VectorisedSums(max_chunk_elements).attached(model, layers, estimator))
    modules = dict(model.named_modules())
    model.to(dev)
    n_seen = 0
    acc: dict[str, torch.Tensor] = {
        n: torch.zeros_like(modules[n].weight, dtype=torch.float64, device=dev) for n in layers
    }
    with _eval_mode(model), torch.enable_grad(), attached as add:
        for b, (x, y, _g) in rank_batches(data, batch_size, dev, workers):
            add(model, layers, acc, x, y, BatchDraws(estimator, mc_samples, probes, batch_generator(seed, b), dev))
            n_seen += len(y)
            progress(task, n_seen, max(total, n_seen))
    return _reduced_mean(acc, n_seen, "curvature")


def group_gradient(
    model: nn.Module,
    data: BatchSource,
    device: str | torch.device = "cpu",
    *,
    layers: Sequence[str] | None = None,
    batch_size: int = DEFAULT_CURVATURE_BATCH_SIZE,
    workers: int = 0,
) -> dict[str, torch.Tensor]:
    """Mean gradient of the cross-entropy (true labels) over `data` for the weights of `layers` (eval mode);
    under torchrun each rank sums its share of the batches and the sums are added over ranks."""
    dev = torch.device(device)
    layers = _check(model, "empirical", layers)
    modules = dict(model.named_modules())
    params = [modules[n].weight for n in layers]
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in zip(layers, params)}
    n_seen = 0
    model.to(dev)
    with _eval_mode(model), torch.enable_grad():
        for _b, (x, y, _g) in rank_batches(data, batch_size, dev, workers):
            loss = F.cross_entropy(model(x).float(), y, reduction="sum")
            for n, g in zip(layers, torch.autograd.grad(loss, params)):
                acc[n] += g.float()
            n_seen += len(y)
    return _reduced_mean(acc, n_seen, "the gradient")

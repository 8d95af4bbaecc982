"""Trial steps on one rank: real forward + backward + optimizer step at chosen batch sizes.

Not collective: a trial runs on the unwrapped model with no process-group call inside, so an
out-of-memory error on one rank cannot leave another rank waiting in a collective. Everything a
trial touches is put back afterwards: the model's weights and buffers (BatchNorm statistics),
its gradients and train/eval mode, the optimizer's state and every random generator. Inputs are
random tensors of the dataset's sample shape from a private generator.

Before the first trial the optimizer state and the gradients are created (a step on zero
gradients), so each trial meets the memory of a training step in steady state and readings are
"bytes above parameters + gradients + optimizer state": the part that grows with the batch.
Each reading is taken from the trial's own start (after handing freed memory back), so a cache
that an earlier trial created and kept is not counted twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ddp.errors import MemoryBudgetError
from ddp.memory.estimate import MB, Estimate
from ddp.memory.policy import Search, fit_affine
from ddp.memory.readers import MemoryReader
from ddp.engine.rng import capture_rng, restore_rng

Step = Callable[[int], "float | None"]  # batch → bytes the step added, None on out-of-memory


@dataclass
class ProbeResult:
    """One search (``train`` or ``eval``) on one rank. Bytes; ``pick`` 0 when batch 1 did not fit."""

    kind: str
    pick: int
    budget: float  # total bytes for the training (parameters ... activations, and the data on the device)
    state: float  # held before the first activation (measured, plus DDP buckets and the data on the device)
    search: Search
    seconds: float

    def table(self) -> list[dict[str, Any]]:
        """batch → peak MB (measured, and predicted by the fit before running it)."""
        rows = []
        for trial in self.search.trials:
            rows.append({
                "batch": trial.batch, "phase": trial.phase,
                "peak_mb": None if trial.reading is None else round((self.state + trial.reading) / MB, 2),
                "predicted_mb": None if trial.predicted is None else round((self.state + trial.predicted) / MB, 2),
                "result": "fits" if trial.fits else ("out of memory" if trial.reading is None else "over budget"),
            })
        return rows

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "pick": self.pick, "budget_mb": round(self.budget / MB, 2),
                "state_mb": round(self.state / MB, 2), "trial_steps": len(self.search.trials),
                "measure_steps": self.search.count("measure"), "verify_steps": self.search.count("verify"),
                "seconds": round(self.seconds, 3), "table": self.table()}


def run_search(search: Search, step: Step) -> Search:
    """Run ``step`` at each batch the policy asks for until it settles."""
    while (planned := search.next()) is not None:
        batch, phase = planned
        search.record(batch, phase, step(batch))
    return search


@dataclass
class TrialBench:
    """A model and optimizer set up for trial steps; ``restored`` puts them back as they were."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    sample_shape: tuple[int, ...]
    classes: int
    reader: MemoryReader
    state_bytes: int = 0
    _generator: torch.Generator | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.reader.device

    def prime(self) -> None:
        """Create the gradients and the optimizer state (one step on zero gradients). Where the
        reader asks for it (host RAM), also run one uncounted batch-1 step first: the first
        backward grows RSS once and for good (thread pools, kernel caches), which is not memory
        that grows with the batch."""
        self._generator = torch.Generator(device=self.device).manual_seed(0)
        if getattr(self.reader, "warm_up", False):
            self._run(smallest_batch(self.model), self._train)
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.zeros_like(p)
        self.optimizer.step()
        held = _tensor_bytes(self.model.parameters()) + _tensor_bytes(p.grad for p in params)
        self.state_bytes = held + _tensor_bytes(_optimizer_tensors(self.optimizer))
        self.reader.recover()

    def train_step(self, batch: int) -> float | None:
        """Forward, loss, backward, optimizer step, in the trainer's order. Bytes the step added."""
        self.model.train()
        return self._trial(batch, self._train)

    def eval_step(self, batch: int) -> float | None:
        """Forward only, without gradients (as evaluation runs). Bytes the step added."""
        self.model.eval()
        try:
            return self._trial(batch, self._eval)
        finally:
            self.model.train()

    def _train(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        loss = F.cross_entropy(self.model(inputs), targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def _eval(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        with torch.no_grad():
            F.cross_entropy(self.model(inputs), targets)

    def _trial(self, batch: int, run: Callable[[torch.Tensor, torch.Tensor], None]) -> float | None:
        """Bytes the step added to what the process held just before it (the batch included):
        measured from each trial's own start, so anything an earlier trial left behind for good
        is not counted again."""
        self.reader.recover()
        before = self.reader.current()
        peak = None
        try:
            peak = self._run(batch, run)
        except Exception as err:  # noqa: BLE001 - only out-of-memory is expected; others re-raised
            if not self.reader.is_oom(err):
                raise
        if peak is None:  # recover outside the except block: its traceback still holds the trial's tensors
            self._recover()
            return None
        return float(max(peak - before, 0))

    def _run(self, batch: int, run: Callable[[torch.Tensor, torch.Tensor], None]) -> int:
        inputs = torch.randn((batch, *self.sample_shape), device=self.device, generator=self._generator)
        targets = torch.randint(0, self.classes, (batch,), device=self.device, generator=self._generator)
        self.reader.start()
        run(inputs, targets)
        return self.reader.peak()

    def _recover(self) -> None:
        """After an out-of-memory error: drop the half-built graph and the gradients, free the
        cache, and recreate zero gradients so the next trial starts from the same state."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.grad = None
        self.reader.recover()
        for p in params:
            p.grad = torch.zeros_like(p)


@contextmanager
def restored(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """On exit, ``model``, ``optimizer`` and every RNG are exactly as on entry (copies on the CPU)."""
    rng = capture_rng()
    weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    grads = {name: None if p.grad is None else p.grad.detach().to("cpu", copy=True)
             for name, p in model.named_parameters()}
    optim_state = _to_cpu(optimizer.state_dict())
    training = model.training
    try:
        yield
    finally:
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()
        model.load_state_dict(weights)
        for name, p in model.named_parameters():
            p.grad = None if grads[name] is None else grads[name].to(p.device)
        optimizer.load_state_dict(optim_state)
        model.train(training)
        restore_rng(rng)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for state in optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def probe_model(model: nn.Module, optimizer: torch.optim.Optimizer, sample_shape: tuple[int, ...], classes: int,
                reader: MemoryReader, budget: float, limits: dict[str, int], estimate: Estimate,
                fsdp: Estimate | None = None, fraction: float = 0.9) -> dict[str, ProbeResult]:
    """Search the largest train and/or eval batch (``limits`` keys: "train", "eval") under
    ``budget`` bytes on this rank. Not collective. Raises ``MemoryBudgetError`` when batch 1 does
    not fit, before any trial when the parameters, gradients and optimizer state alone do not
    (``fsdp``: the estimate under dist.parallel=fsdp, which the refusal then weighs).

    Under FSDP (``estimate.shards`` > 1) the trials still run on the whole, unwrapped model, which
    measures the activations (each rank runs its batch through every gathered block); the state
    they sit on is the sharded estimate, not what the unwrapped copy holds. A trial may still add no
    more than ``fraction`` of the memory free beside the primed copy: the copy is really there, so a
    batch past that is the copy's limit, not FSDP's, and the pick stops below it."""
    if estimate.state > budget:
        raise budget_error(estimate, budget, None, fsdp=fsdp)
    results: dict[str, ProbeResult] = {}
    with restored(model, optimizer):
        bench = TrialBench(model, optimizer, tuple(sample_shape), classes, reader)
        bench.prime()
        state = _state(bench, estimate)
        room = budget - state
        if estimate.shards > 1:  # beside the whole copy: never more than what is free (no OOM killer on the CPU)
            room = min(room, fraction * reader.room())
        for kind, limit in limits.items():
            started = time.perf_counter()
            step = bench.train_step if kind == "train" else bench.eval_step
            start = smallest_batch(model)
            search = run_search(Search(budget=room, limit=max(start, limit), start=start), step)
            results[kind] = ProbeResult(kind, search.good, budget, state, search, time.perf_counter() - started)
            if kind == "train":
                _fill_activations(estimate, search)
            if search.good == 0:
                raise budget_error(estimate, budget, search.trials[0].reading, kind, tried=True, batch=start,
                                   fsdp=fsdp)
    return results


def _state(bench: TrialBench, estimate: Estimate) -> float:
    """What a step's activations sit on: what the primed copy holds (parameters, gradients,
    optimizer state) plus DDP's buckets and the data on the device; under FSDP the sharded
    estimate instead (the copy holds the whole model, which no FSDP rank does)."""
    if estimate.shards > 1:
        return float(estimate.state)
    return bench.state_bytes + estimate.ddp_buckets + estimate.data_on_device


def _fill_activations(estimate: Estimate, search: Search) -> None:
    points = search.points
    if len({b for b, _ in points}) >= 2:
        fit = fit_affine(points)
        estimate.per_sample, estimate.fixed = max(fit.slope, 0.0), max(fit.intercept, 0.0)
    elif points:
        estimate.per_sample, estimate.fixed = points[0][1] / points[0][0], 0.0


def smallest_batch(model: nn.Module) -> int:
    """2 for models with BatchNorm (training on one sample is an error there), else 1."""
    return 2 if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) else 1


def budget_error(estimate: Estimate, budget: float, activations: float | None, kind: str = "train",
                 tried: bool = False, batch: int = 1, fsdp: Estimate | None = None) -> MemoryBudgetError:
    """The one line for a budget that cannot hold batch 1, with where the memory goes. ``fsdp``: the
    same model's estimate under ``dist.parallel=fsdp`` at this world size (DDP runs of 2+ ranks),
    said in the hint with whether it would fit."""
    key = "data.batch_size" if kind == "train" else "data.eval_batch_size"
    parts = _parts(estimate)
    if activations is None:
        what = f"and ran out of memory at batch {batch}" if tried else "before any activation"
        needs = f"{estimate.state / MB:,.1f} MB {what}"
    else:
        parts.append(f"activations {activations / MB:,.1f}")
        needs = f"{(estimate.state + activations) / MB:,.1f} MB at batch {batch}"
    return MemoryBudgetError(
        f"{key}=auto: the model needs {needs} per rank ({' + '.join(parts)} MB), more than the memory "
        f"budget of {budget / MB:,.1f} MB.",
        _fsdp_hint(fsdp, budget, activations, batch, estimate.state - estimate.ddp_buckets)
        + "raise memory.budget_mb or memory.fraction, free memory on the device, or use a smaller model "
        "(optim.name=sgd keeps less optimizer state than adam)"
        + ("; data.loader=dataloader keeps the data off the device" if estimate.data_on_device else ""))


def _parts(estimate: Estimate) -> list[str]:
    """Where the memory goes, in MB, as the refusal lists it."""
    parts = [f"parameters {estimate.parameters / MB:,.1f}", f"gradients {estimate.gradients / MB:,.1f}",
             f"optimizer {estimate.optimizer / MB:,.1f}"]
    if estimate.master:
        parts.append(f"fp32 master copy {estimate.master / MB:,.1f}")
    if estimate.shards > 1:
        parts[-1] += f" (shards: each ÷ {estimate.shards})"
    if estimate.ddp_buckets:
        parts.append(f"DDP buckets {estimate.ddp_buckets / MB:,.1f}")
    if estimate.gathered:
        parts.append(f"gathered root + largest block {estimate.gathered / MB:,.1f}")
    if estimate.data_on_device:
        parts.append(f"data on device {estimate.data_on_device / MB:,.1f}")
    return parts


def _fsdp_hint(fsdp: Estimate | None, budget: float, activations: float | None, batch: int, whole: float) -> str:
    """Whether ``dist.parallel=fsdp`` at this world size would hold the model (at ``batch``, when
    the activations were measured), with its numbers; '' without an FSDP estimate. ``whole``: what
    an unsharded copy holds before any activation (auto's trial steps run on one)."""
    if fsdp is None:
        return ""
    need = fsdp.state + (activations or 0.0)
    at = f"at batch {batch} " if activations is not None else "before any activation "
    numbers = (f"under dist.parallel=fsdp at {fsdp.shards} ranks it would need {need / MB:,.1f} MB per rank {at}"
               f"({' + '.join(_parts(fsdp))}"
               + (f" + activations {activations / MB:,.1f}" if activations is not None else "") + " MB)")
    if need > budget:
        return f"{numbers}, which does not fit either; "
    if whole > budget:  # auto's trial steps hold a whole copy (ddp.memory.resolve._check_whole_copy)
        return (f"{numbers}, which fits the {budget / MB:,.1f} MB budget: try dist.parallel=fsdp with "
                f"data.batch_size=N (auto's trial steps would need a whole copy of the model, {whole / MB:,.1f} MB); or ")
    return (f"{numbers}, which fits the {budget / MB:,.1f} MB budget: try dist.parallel=fsdp (data.batch_size=auto "
            "sizes its batch too); or ")

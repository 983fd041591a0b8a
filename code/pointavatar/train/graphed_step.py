"""The training step's forward, loss and backward replayed from a CUDA graph (``train.cuda_graph``).

At small point counts a step is bound by the host launching a few thousand kernels, not by the GPU
(issue 10: about 25 ms a step at 6,400 points, of which the GPU works about 9). A CUDA graph launches
them all at once. The graph is captured for one configuration (point count, batch shape, radius, FLAME
prior weight, parameter storage) and replayed until that changes (a prune or upsample, a new epoch's
prior weight); then the first step of the new configuration runs eagerly, the second captures.

What the captured region needs, and how it gets it:
- No host sync inside: the rasterizer gets a fixed budget of (tile, point) pairs
  (`render.fixed_binning`), sized from the last eager step with a margin; the device reports the pairs
  it needed and a step that needed more is run again eagerly, with a larger budget for the next capture.
  The other host reads of a step were removed from the model, the loss and the visibility bookkeeping.
- Fixed addresses: the batch is copied into the graph's own input tensors; the gradients are the graph's
  tensors, put back into ``param.grad`` after each replay (the optimizer step runs outside the graph).
- Per-frame inputs (sparse embeddings, ``engine/inputs.py``): the graph takes their values as leaf
  tensors; their gradients are passed on to the embeddings eagerly after the replay.

Same values as the eager step (GPU tests): the graph replays the same kernels. The eikonal jitter is
random in both, from the same generator.
"""

from __future__ import annotations

import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from pointavatar.errors import PointAvatarError
from pointavatar.render import fixed_binning


class StepResult(NamedTuple):
    """What the trainer reads after a step. With a graph these are its own tensors: valid until the next
    call, which overwrites them."""

    losses: dict[str, torch.Tensor]
    fragment_idx: torch.Tensor
    fragment_weights: torch.Tensor


def forward_loss_backward(
    model, loss_fn, model_input: dict, ground_truth: dict, lbs_weight: float
) -> StepResult:
    """One training step's forward, loss and backward, run eagerly: what the trainer does per batch
    without a CUDA graph, and what the graph captures."""
    out = model(model_input)
    losses = loss_fn(out, ground_truth, flame=getattr(model, "FLAMEServer", None), lbs_weight=lbs_weight)
    losses["loss"].backward()
    return StepResult(losses, out.fragment_idx, out.fragment_weights)


class _Captured(NamedTuple):
    graph: torch.cuda.CUDAGraph
    inputs: dict
    ground_truth: dict
    result: StepResult
    grads: list[torch.Tensor | None]
    input_grads: dict[str, torch.Tensor | None]


class GraphedStep:
    """``step(model_input, ground_truth, lbs_weight)``: forward, loss and backward of a training step;
    gradients left in ``param.grad`` (and passed on to the per-frame inputs), as the eager step would.

    margin, slack: the rasterizer's pair budget is ``needed * margin + slack`` of the last eager step.
    Counters for logs and tests: ``captures``, ``eager_steps``, ``overflows``, and the seconds spent in
    eager steps and in captures (``eager_seconds``, ``capture_seconds``, wall clock with the device
    synchronised around them; a capture's own replay not included). A capture that fails
    raises `PointAvatarError` (set ``train.cuda_graph = false``).
    """

    def __init__(
        self, model: torch.nn.Module, loss_fn: torch.nn.Module, margin: float = 1.25, slack: int = 4096
    ):
        self.model = model
        self.loss_fn = loss_fn
        self.margin = margin
        self.slack = slack
        self.captures = 0
        self.eager_steps = 0
        self.overflows = 0
        self.eager_seconds = 0.0
        self.capture_seconds = 0.0
        self.capacity: int | None = None
        self._key = None
        self._captured: _Captured | None = None
        self._needed: torch.Tensor | None = None
        self._compile_fallback_warned = False

    def __call__(self, model_input: dict, ground_truth: dict, lbs_weight: float) -> StepResult:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self._needed is None or self._needed.device != params[0].device:
            self._needed = torch.zeros((), dtype=torch.int64, device=params[0].device)
        key = self._signature(model_input, ground_truth, lbs_weight, params)
        if key != self._key:
            self.release()
            self._key = key
            return self._eager(model_input, ground_truth, lbs_weight, params)
        if self._captured is None and self._compile_fell_back():
            # A torch.compile that failed leaves autograd state behind (seen on the H200: a gradient-
            # accumulation node of the default stream, kept alive by the failed trace) that makes the
            # capture fail; the eager steps are exact, so the run goes on without the graph.
            if not self._compile_fallback_warned:
                self._compile_fallback_warned = True
                warnings.warn(
                    "torch.compile of the fast path failed earlier in this run (warning above); the "
                    "training steps run eagerly from now on, without the CUDA graph",
                    stacklevel=2,
                )
            return self._eager(model_input, ground_truth, lbs_weight, params)
        if self._captured is None:
            try:
                self._captured = self._capture(model_input, ground_truth, lbs_weight, params)
            except Exception as exc:
                # No eager fallback: a failed capture leaves the CUDA random generator in capture
                # state, so the process cannot go on reliably. Stop with the fix, and the cause: the
                # first error inside the capture (what ending the capture raised hides it).
                self.release()
                root = exc
                while root.__context__ is not None:
                    root = root.__context__
                if isinstance(root, torch.cuda.OutOfMemoryError):
                    # Not the graph's fault: the trainer says what to change. A new exception, as
                    # re-raising root here would make its context chain a cycle.
                    raise torch.cuda.OutOfMemoryError(str(root)) from None
                traceback.print_exception(root, file=sys.stderr)
                frames = [f for f in traceback.extract_tb(root.__traceback__) if "pointavatar" in f.filename]
                where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
                raise PointAvatarError(
                    f"CUDA graph capture of the training step failed ({type(root).__name__}{where}: "
                    f"{str(root).splitlines()[0] if str(root) else ''}; traceback above). Some operation "
                    "in the step waits for the GPU or copies from the host. Set train.cuda_graph = false "
                    "in the conf and resume with --is_continue (and please report it)."
                ) from exc
        return self._replay(model_input, ground_truth, lbs_weight, params)

    def _compile_fell_back(self) -> bool:
        """Whether a torch.compile of the model's fast path failed and its eager code runs instead."""
        return bool(getattr(self.model, "compile_fell_back", False))

    def release(self) -> None:
        """Drop the captured graph. Its memory pool is private: the blocks that no caller still holds go
        back to the device (``empty_cache``), or the next configuration's eager step would need the old
        graph's memory and its own at once."""
        had_graph = self._captured is not None
        self._captured = None
        self._key = None
        if had_graph:
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------------

    def _signature(self, model_input, ground_truth, lbs_weight, params) -> tuple:
        """Everything the captured kernels hold fixed: shapes, Python numbers, storage addresses."""

        def tensors(d: dict) -> tuple:
            return tuple(
                (k, tuple(v.shape), v.dtype, v.device, v.requires_grad)
                for k, v in sorted(d.items())
                if torch.is_tensor(v)
            )

        pc = getattr(self.model, "pc", None)
        return (
            tensors(model_input),
            tensors(ground_truth),
            float(lbs_weight),
            tuple((p.data_ptr(), tuple(p.shape), p.dtype) for p in params),
            self.model.training,
            None if pc is None else float(pc.radius),
        )

    def _eager(self, model_input, ground_truth, lbs_weight, params) -> StepResult:
        """The plain step; it also measures the rasterizer's pair count for the next capture's budget."""
        self.eager_steps += 1
        start = _synchronized_clock()
        for p in params:
            p.grad = None
        self._needed.zero_()
        with fixed_binning(None, self._needed):
            losses, fragment_idx, fragment_weights = forward_loss_backward(
                self.model, self.loss_fn, model_input, ground_truth, lbs_weight
            )
        self.capacity = int(int(self._needed) * self.margin) + self.slack  # int(): the device is done
        self.eager_seconds += time.perf_counter() - start
        # Detached: a caller holding this step's losses must not keep its autograd graph alive while the
        # next call captures (its gradient-accumulation nodes belong to another stream, which breaks
        # the capture).
        return StepResult({k: v.detach() for k, v in losses.items()}, fragment_idx, fragment_weights)

    def _capture(self, model_input, ground_truth, lbs_weight, params) -> _Captured:
        def static(v):
            if not torch.is_tensor(v):
                return v
            return v.detach().clone().requires_grad_(v.requires_grad)

        inputs = {k: static(v) for k, v in model_input.items()}
        truth = {k: static(v) for k, v in ground_truth.items()}
        for p in params:
            p.grad = None  # so that the backward allocates the gradients from the graph's memory
        start = _synchronized_clock()
        torch.cuda.empty_cache()  # the eager step's cached blocks, for the graph's pool
        graph = torch.cuda.CUDAGraph()
        # "thread_local": only this thread's calls may break the capture, not the DataLoader's pin-memory
        # thread allocating page-locked memory meanwhile (it did, at random, in the default mode).
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._needed.zero_()
            with fixed_binning(self.capacity, self._needed):
                result = forward_loss_backward(self.model, self.loss_fn, inputs, truth, lbs_weight)
        self.captures += 1
        self.capture_seconds += _synchronized_clock() - start
        losses, fragment_idx, fragment_weights = result
        result = StepResult({k: v.detach() for k, v in losses.items()}, fragment_idx, fragment_weights)
        grads = [p.grad for p in params]
        input_grads = {k: v.grad for k, v in inputs.items() if torch.is_tensor(v) and v.requires_grad}
        return _Captured(graph, inputs, truth, result, grads, input_grads)

    def _replay(self, model_input, ground_truth, lbs_weight, params) -> StepResult:
        cap = self._captured
        with torch.no_grad():
            for src, dst in ((model_input, cap.inputs), (ground_truth, cap.ground_truth)):
                for k, v in dst.items():
                    if torch.is_tensor(v):
                        v.copy_(src[k])
        cap.graph.replay()
        if int(self._needed) > self.capacity:
            # The rasterizer's budget was too small for this batch: its fragments lack pairs. Redo the
            # step eagerly (which sizes the budget anew) and capture again next time.
            self.overflows += 1
            self._captured = None
            return self._eager(model_input, ground_truth, lbs_weight, params)
        for p, g in zip(params, cap.grads, strict=True):
            p.grad = g
        live = [(v, cap.input_grads[k]) for k, v in model_input.items() if k in cap.input_grads]
        live = [(v, g) for v, g in live if v.grad_fn is not None and g is not None]
        if live:
            torch.autograd.backward([v for v, _ in live], [g for _, g in live])
        return cap.result


def _synchronized_clock() -> float:
    """time.perf_counter() once the CUDA device has finished its queued work."""
    torch.cuda.synchronize()
    return time.perf_counter()

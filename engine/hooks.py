"""Forward hooks as context managers: read keys, steer the residual stream, stop early.

Every hook is removed when its ``with`` block ends, even on error, so that no edit can leave a
stray hook behind on a model that the daemon keeps for months.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import torch
from torch import nn

from engine.architecture import get_module

ForwardHook = Callable[[nn.Module, tuple[Any, ...], Any], Any]


class StopForward(Exception):  # noqa: N818 - control flow, not an error
    """Raised by a hook to end a forward pass once everything needed has been read."""


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output (a tensor, or a tuple starting with one)."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden-state tensor replaced, keeping the rest of a tuple."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def forward_hooks(model: nn.Module, hooks: Mapping[str, ForwardHook]) -> Iterator[None]:
    """Register forward hooks by module name for the duration of the block."""
    handles = [get_module(model, name).register_forward_hook(hook) for name, hook in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_inputs(
    model: nn.Module, names: list[str], stop_after: str | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the first positional input of each named module; optionally stop the forward after one."""
    seen: dict[str, torch.Tensor] = {}

    def make(name: str) -> ForwardHook:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            seen[name] = args[0]
            if name == stop_after:
                raise StopForward

        return hook

    hooks = {name: make(name) for name in names}
    if stop_after is not None and stop_after not in hooks:
        hooks[stop_after] = make(stop_after)
    with forward_hooks(model, hooks):
        yield seen


@contextmanager
def capture_outputs(
    model: nn.Module, names: list[str], stop_after: str | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the hidden-state output of each named module; optionally stop the forward after one."""
    seen: dict[str, torch.Tensor] = {}

    def make(name: str) -> ForwardHook:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            seen[name] = hidden_of(output)
            if name == stop_after:
                raise StopForward

        return hook

    with forward_hooks(model, {name: make(name) for name in {*names, *([stop_after] if stop_after else [])}}):
        yield seen


@contextmanager
def add_at_positions(
    model: nn.Module, name: str, rows: torch.Tensor, positions: torch.Tensor, vectors: Callable[[], torch.Tensor]
) -> Iterator[None]:
    """Add ``vectors()[i]`` to the output of ``name`` at ``(rows[i], positions[i])``.

    ``vectors`` is called on every forward so that a trainable tensor can be read afresh.
    """

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        hidden = hidden_of(output)
        added = torch.zeros_like(hidden).index_put((rows, positions), vectors().to(hidden.dtype), accumulate=True)
        return with_hidden(output, hidden + added)

    with forward_hooks(model, {name: hook}):
        yield


@contextmanager
def add_linear_update(model: nn.Module, name: str, update: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Add ``update(module_input)`` to a module's output: a virtual weight change ``x -> x dW^T``."""

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        hidden = hidden_of(output)
        return with_hidden(output, hidden + update(args[0]).to(hidden.dtype))

    with forward_hooks(model, {name: hook}):
        yield


def run_until_stopped(model: nn.Module, **inputs: Any) -> None:
    """Run a forward pass that a :class:`StopForward` hook is expected to end."""
    with suppress(StopForward):
        model(**{"use_cache": False, **inputs})


class _Replay(nn.Module):
    """Stands in for a decoder block: returns the output the real block gave for the same input."""

    def __init__(self, recorded: Callable[[], Any]) -> None:
        super().__init__()
        self.recorded = recorded

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        output = self.recorded()
        if hidden_of(output).shape != hidden_states.shape:
            raise RuntimeError("a replayed block was called on other inputs than it recorded")
        return output


@contextmanager
def replay_lower_layers(
    model: nn.Module, layers: str, upto: int, runs: Sequence[Mapping[str, Any]]
) -> Iterator[Callable[[int], None]]:
    """Inside the block, a forward of ``runs[i]`` after ``select(i)`` replays blocks ``0..upto``.

    The target optimisation runs the same prompts dozens of times while only what happens after
    block ``upto`` changes; recording the blocks' outputs once skips that share of every forward.
    Several runs (the chunks of a large batch) are recorded once each; ``select`` (yielded) says
    which one the next forward is. Hooks registered by name after entering (e.g. on block
    ``upto``) attach to the stand-ins.
    """
    container = get_module(model, layers)
    names = [f"{layers}.{i}" for i in range(upto + 1)]
    recorded: list[dict[str, Any]] = []

    def make(name: str, seen: dict[str, Any]) -> ForwardHook:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            seen[name] = output
            if name == names[-1]:
                raise StopForward

        return hook

    for inputs in runs:
        seen: dict[str, Any] = {}
        with torch.no_grad(), forward_hooks(model, {name: make(name, seen) for name in names}):
            run_until_stopped(model, **inputs)
        recorded.append(seen)
    current = [0]

    def select(index: int) -> None:
        current[0] = index

    def output_of(name: str) -> Callable[[], Any]:
        return lambda: recorded[current[0]][name]

    originals = [container[i] for i in range(upto + 1)]
    try:
        for i, name in enumerate(names):
            container[i] = _Replay(output_of(name))
        yield select
    finally:
        for i, module in enumerate(originals):
            container[i] = module

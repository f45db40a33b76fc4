"""How the ML stages run torch: CPU threads and mixed precision, one policy for all of them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run a block with ``threads`` intra-op CPU threads, restoring the caller's setting.

    Why not always all cores: on a box shared with other busy processes, torch's OpenMP
    threads spin at every barrier while the cores are taken, and two threads ran a step 2.5-4x
    *slower* than one (measured on the 2-core demo machine under load, for the CLIP towers,
    the reward head and the tiny UNet alike); one thread is also bitwise reproducible across
    machines. ``None`` leaves torch's setting alone."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bf16_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (weights stay fp32); CPU runs plain fp32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def out_of_time(step: int, now: float, step_time: float, deadline: float) -> bool:
    """The training loops' time-budget rule: stop when the next step (``step_time``, an
    estimate of one) would end after ``deadline`` — but never before the first step, so a
    budget spent on setup (decoding, encoding) still trains, saves and reports one step."""
    return step > 0 and now + step_time > deadline


def tail_mean(curve: Sequence[tuple[int, float]]) -> float:
    """Mean of the last 10 % (at least one) of a ``(step, value)`` curve — a training loss
    summary less noisy than the last step's; NaN for an empty curve."""
    if not curve:
        return float("nan")
    tail = curve[-max(1, len(curve) // 10) :]
    return float(sum(v for _, v in tail) / len(tail))

"""The training loop's periodic work as small hooks: after each optimizer step the loop asks every
hook whether it is due and runs it. Logging, the held-out loss and (from the evaluation layer,
passed in by the `train` command) lm-eval tasks are hooks; checkpointing and preemption stay in
the loop, which decides when it stops."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Protocol

import jax


@dataclasses.dataclass
class StepInfo:
    """What a hook sees after optimizer step `done` (1-based) of `total`."""

    done: int
    total: int
    start: int  # the step this process started (or resumed) from
    state: dict  # params, opt_state, step (device arrays)
    metrics: Any  # the step's metrics (device arrays; fetching them waits for the step)
    log: Callable[..., None]  # log(metrics: dict, prefix="") at this step


class Hook(Protocol):
    pauses_clock: bool  # its time is kept out of tokens/s

    def due(self, done: int, total: int, start: int) -> bool: ...

    def run(self, info: StepInfo) -> None: ...


class Throughput:
    """Steps and seconds since the last log (the first window includes compilation)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def steps_per_s(self) -> float:
        return self.steps / (time.perf_counter() - self.start)


class LogMetrics:
    """Loss, accuracy, lr, epoch, tokens/s, MFU and the time the loop waited for data, every
    `every` steps, at the first step of a (resumed) run and at the last."""

    pauses_clock = False

    def __init__(self, every: int, schedule, batches_per_epoch: int, tokens_per_step: int,
                 flops_per_step: float, peak_flops: float, clock: Throughput, data_wait: Callable[[], float],
                 bar=None):
        self.every, self.schedule, self.batches_per_epoch = every, schedule, batches_per_epoch
        self.tokens_per_step, self.flops_per_step, self.peak = tokens_per_step, flops_per_step, peak_flops
        self.clock, self.data_wait, self.bar = clock, data_wait, bar
        self.first_loss = self.last_loss = None

    def due(self, done: int, total: int, start: int) -> bool:
        return done % self.every == 0 or done == total or done == start + 1

    def run(self, info: StepInfo) -> None:
        m = {k: float(v) for k, v in jax.device_get(info.metrics).items()}
        steps_per_s = self.clock.steps_per_s()
        m.update(lr=float(self.schedule(info.done - 1)), epoch=info.done / self.batches_per_epoch,
                 tokens_per_s=steps_per_s * self.tokens_per_step, mfu=steps_per_s * self.flops_per_step / self.peak,
                 data_wait_s=self.data_wait())
        info.log(m)
        self.first_loss = m["loss"] if self.first_loss is None else self.first_loss
        self.last_loss = m["loss"]
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['accuracy']:.3f}")
        self.clock.reset()


class HeldOutEval:
    """The held-out loss every `every` steps (the final one is the loop's, after the last step)."""

    pauses_clock = True

    def __init__(self, evaluate: Callable[[Any], dict], every: int):
        self.evaluate, self.every = evaluate, every

    def due(self, done: int, total: int, start: int) -> bool:
        return bool(self.every) and done % self.every == 0 and done != total

    def run(self, info: StepInfo) -> None:
        info.log(self.evaluate(info.state["params"]), prefix="eval_")


class Checkpointing:
    """Saves when the checkpoint policy says so, at the last step, and when a preemption signal
    arrived (then asks the loop to stop). Every process takes part every step: the signal and the
    time-based policy are agreed across processes so all save and stop at the same step."""

    pauses_clock = False

    def __init__(self, due: Callable[[int], bool], save: Callable[[int, dict], None],
                 signalled: Callable[[], bool], agree: Callable[..., tuple[bool, ...]]):
        self._due, self._save, self._signalled, self._agree = due, save, signalled, agree
        self.stop = False  # the loop ends after this step

    def due(self, done: int, total: int, start: int) -> bool:
        return True

    def run(self, info: StepInfo) -> None:
        preempted, due = self._agree(self._signalled(), self._due(info.done))
        if due or preempted or info.done == info.total:
            self._save(info.done, info.state)
        self.stop = preempted

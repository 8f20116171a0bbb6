"""Metric writing: ``WORKDIR/metrics.jsonl`` (one JSON object per logged step), TensorBoard
(tensorboardX, no TensorFlow), and a console line. Only process 0 writes. ``WORKDIR`` may be a
``gs://`` URL (``storage``).

Names are grouped: ``train/``, ``eval/<name>/``, ``perf/``, ``opt/``, ``data/``.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import sys
import time

import jax
from absl import logging

from maskfeat_jax import storage


def summary_writer(logdir: str):
    """A tensorboardX ``SummaryWriter`` on ``logdir``, imported without torch.

    tensorboardX's writer imports torch where it is installed, only to accept torch tensors;
    this package writes floats and numpy arrays, and importing torch costs 2-3 s of every
    start-up. Where this process has not imported torch, it is hidden from that one import."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None        # `import torch` raises ImportError: tensorboardX's fallback
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter(logdir)


class Writer:
    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self._jsonl = self._tb = None
        if self.enabled:
            self._jsonl = storage.LineLog(storage.path(workdir) / "metrics.jsonl")
            try:
                self._tb = summary_writer(str(storage.path(workdir) / "tensorboard"))
            except ImportError:  # TensorBoard is optional
                self._tb = None
            except Exception as e:  # noqa: BLE001 - gs://: google-cloud-storage without a project or credentials
                logging.warning("TensorBoard events are not written (%s: %s); metrics.jsonl is", type(e).__name__, e)
                self._tb = None

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **clean}))
        if self._tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self):
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


class Throughput:
    """Speed between consecutive reads of finished steps' metrics: the host only knows a
    step is done once its metrics are fetched, so rates are measured between fetches."""

    def __init__(self, images_per_step: int, flops_per_image: float, num_devices: int, peak_flops: float):
        self.ips, self.fpi, self.n, self.peak = images_per_step, flops_per_image, num_devices, peak_flops
        self.last = None          # (step, time) of the previous fetch
        self.data_wait = 0.0      # seconds the loop spent waiting for input since then

    def mark(self, step: int) -> dict:
        now = time.time()
        out = {}
        if self.last is not None and step > self.last[0]:
            dt, steps = now - self.last[1], step - self.last[0]
            tflops = self.fpi * self.ips * steps / dt / self.n / 1e12
            out = {"perf/images_per_sec": self.ips * steps / dt, "perf/step_seconds": dt / steps,
                   "perf/data_wait_fraction": min(self.data_wait / dt, 1.0),
                   "perf/tflops_per_device": tflops, "perf/mfu": tflops * 1e12 / self.peak}
        self.last, self.data_wait = (step, now), 0.0
        return out

    def restart(self, step: int) -> None:
        """The next window starts now, at finished step ``step``: time spent since the last read
        outside training (evaluation, figures) is not counted as step time."""
        self.last, self.data_wait = (step, time.time()), 0.0


class Logger:
    """The training metrics of logged steps, written one step late: ``dispatched(step, m)`` keeps
    step N's device metrics and writes those of the logged step before it, which the device has
    finished (or is about to) once step N is queued, so the host never waits on the device to log.

    ``flush`` writes the kept step now (last step, preemption, before an evaluation); ``paused``
    keeps the time spent in its block (evaluations, figures) out of the step times. With
    ``nonfinite='error'`` a logged step whose update was skipped (non-finite loss or gradient
    norm) raises; skips already counted in the checkpoint the run resumed from
    (``skipped_before``) do not count again, so a run stopped this way can be resumed."""

    def __init__(self, writer: Writer, progress: Progress, meter: Throughput, *, every_steps: int,
                 total_steps: int, steps_per_epoch: int, nonfinite: str = "error", skipped_before: int = 0):
        self.writer, self.progress, self.meter = writer, progress, meter
        self.every, self.total, self.spe = every_steps, total_steps, steps_per_epoch
        self.nonfinite, self.skipped_before = nonfinite, skipped_before
        self.last: dict = {}      # the scalars written last (a logged step's, plus evaluations)
        self._pending = None      # (step, device metrics) of a logged step not yet written
        self._step = None         # the last step dispatched

    def dispatched(self, step: int, device_metrics: dict) -> None:
        """Step ``step`` is queued: writes the previous logged step and keeps this one if logged."""
        self.flush()
        self._step = step
        if step % self.every == 0 or step == self.total:
            self._pending = (step, device_metrics)

    def flush(self) -> dict:
        """Fetches, writes and prints the kept step's metrics (waiting for the device)."""
        if self._pending is None:
            return self.last
        step, device_metrics = self._pending
        self._pending = None
        m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        m["train/epoch"] = step / self.spe
        m.update(self.meter.mark(step))
        self.writer.write(step, m)
        self.progress.update(step, m)
        self.last = m
        new = int(m.get("train/nonfinite_steps", 0)) - self.skipped_before
        if new > 0 and self.nonfinite == "error":
            raise FloatingPointError(
                f"non-finite loss or gradient norm in {new} step(s) by step {step} (config.nonfinite='error'); "
                f"those updates were not applied and no non-finite state was saved, so the run can be resumed. "
                f"Set config.nonfinite='skip' to skip such steps and go on.")
        return m

    def write(self, step: int, scalars: dict) -> None:
        """Writes ``scalars`` (evaluations, compile time) as a row of their own for ``step``."""
        self.writer.write(step, scalars)
        self.last.update(scalars)

    @contextlib.contextmanager
    def waiting_for_data(self):
        """Time in this block counts as waiting for input (``perf/data_wait_fraction``)."""
        t0 = time.time()
        try:
            yield
        finally:
            self.meter.data_wait += time.time() - t0

    @contextlib.contextmanager
    def paused(self):
        """Writes the kept step first (its speed measured before the block), then leaves the
        block's time out of the next step times."""
        self.flush()
        try:
            yield
        finally:
            if self._step is not None:
                self.meter.restart(self._step)

    def close(self) -> None:
        """Closes the writer. A step still kept is not written: the loop flushes its last step,
        and a run that stops on an error leaves the rest unread."""
        self.writer.close()


class Progress:
    """One console line per logged step (a live bar when attached to a terminal).

    The ETA counts from ``restart`` (the trainer calls it once the step is compiled), so a
    resumed run's first estimate leaves the compile out. ``mfu_estimate``: the peak is a
    measurement (CPU), not a vendor figure, so MFU is shown as ``mfu~``, at most ``>100%``."""

    def __init__(self, total_steps: int, steps_per_epoch: int, start_step: int, mfu_estimate: bool = False):
        self.total, self.spe, self.start = total_steps, max(steps_per_epoch, 1), start_step
        self.t0 = time.time()
        self.tty = sys.stdout.isatty()
        self.enabled = jax.process_index() == 0
        self.mfu_estimate = mfu_estimate
        self._open = False        # a bar line without its newline is on the terminal

    def restart(self, step: int) -> None:
        self.start, self.t0 = step, time.time()

    def print(self, text: str) -> None:
        """Prints ``text`` on its own line (ending the live bar's line first)."""
        if self._open:
            sys.stdout.write("\n")
            self._open = False
        print(text, flush=True)

    def _mfu(self, v: float) -> str:
        if not self.mfu_estimate:
            return f"mfu {v:.1%}"
        return "mfu~ >100%" if v > 1 else f"mfu~ {v:.1%}"

    def update(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        done = step - self.start
        rate = done / max(time.time() - self.t0, 1e-9)
        eta = datetime.timedelta(seconds=int((self.total - step) / rate)) if rate > 0 else "?"
        parts = [f"step {step}/{self.total}", f"ep {step / self.spe:.2f}"]
        for key, fmt in (("train/loss", "loss {:.4f}"), ("opt/lr", "lr {:.3e}"),
                         ("perf/images_per_sec", "img/s {:.1f}"), ("perf/mfu", self._mfu)):
            if key in scalars:
                parts.append(fmt(scalars[key]) if callable(fmt) else fmt.format(scalars[key]))
        parts.append(f"eta {eta}")
        line = " | ".join(parts)
        if self.tty:
            width = 20
            fill = int(width * step / max(self.total, 1))
            sys.stdout.write("\r[" + "#" * fill + "." * (width - fill) + "] " + line)
            sys.stdout.flush()
            self._open = step < self.total
            if not self._open:
                sys.stdout.write("\n")
        else:
            print(line, flush=True)


def logged(workdir: str, step: int, keys) -> bool:
    """Whether ``WORKDIR/metrics.jsonl`` already has a row for ``step`` holding all of ``keys``
    (an evaluation run again adds no duplicate row)."""
    p = storage.path(workdir) / "metrics.jsonl"
    if not p.exists():
        return False
    rows = (json.loads(line) for line in p.read_text().splitlines() if line.strip())
    return any(r.get("step") == step and set(keys) <= set(r) for r in rows)


def last_value(workdir: str, key: str):
    """(step, value) of the last row of ``WORKDIR/metrics.jsonl`` holding ``key``, or None."""
    p = storage.path(workdir) / "metrics.jsonl"
    rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []
    hits = [(r["step"], r[key]) for r in rows if key in r]
    return hits[-1] if hits else None

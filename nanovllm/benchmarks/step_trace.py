"""Where a benchmark's time goes, step by step, without a profiler's overhead.

``StepRecorder`` wraps one engine core's ``schedule`` and ``step`` and keeps, per step, the wall time, the host's
share of it (the rest is waiting on the device), and what was scheduled. On CUDA it also brackets each launched
step with two events, which tell the step's device time and how long the device sat idle before it, waiting for
the host to queue it: with overlap scheduling the step loop's wall times mix steps, the events do not.
``summarise`` groups the steps by kind (steps with prefill, and decode-only steps by batch size), which shows
whether the device or the host sets the pace where. ``JitWatch`` counts kernel compilations (Triton, and
TorchDynamo recompiles) during the timed run: each costs up to a second of host time, and none should happen once
the engine is warm. ``GcWatch`` counts Python's garbage collections and their pauses.
"""
from __future__ import annotations

import gc
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

_DECODE_BUCKETS = ((1, 16), (17, 64), (65, 128), (129, 256), (257, 1 << 30))


@dataclass
class StepRecord:
    wall_ms: float
    host_ms: float  # wall minus the time spent waiting for the device
    num_decodes: int
    num_prefill_tokens: int
    device_ms: float = 0.0  # from the start of the step's device work to its end (CUDA only)
    idle_ms: float = 0.0  # the device's wait for this step to be queued after the previous one ended


class StepRecorder:
    def __init__(self, core: Any) -> None:
        self.core = core
        self.records: list[StepRecord] = []
        self._scheduled: Any = None
        self._schedule, self._step = core.scheduler.schedule, core.step
        core.scheduler.schedule, core.step = self._recording_schedule, self._recording_step
        self._events: list[Any] = []  # per record: (start, end) CUDA events of the step it launched, or None
        self._launched: Any = None
        # the events bracket the runner's launch: the step's host arrays are built by then, so a device
        # that waits for them counts as idle, not busy
        self._runner = getattr(core.executor, "runner", core.executor)
        self._launch = None
        if core.executor.device_type == "cuda":
            self._launch = self._runner.launch
            self._runner.launch = self._recording_launch

    def _recording_launch(self, *args: Any) -> Any:
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        pending = self._launch(*args)
        end.record()
        self._launched = (start, end)
        return pending

    def _recording_schedule(self) -> Any:
        self._scheduled = self._schedule()
        return self._scheduled

    def _recording_step(self) -> Any:
        stats = self.core.stats
        wall, host = stats.step_time_s, stats.host_time_s
        result = self._step()
        chunks = self._scheduled.chunks if self._scheduled is not None else []
        decodes = sum(1 for c in chunks if c.start >= c.request.num_prompt_tokens)
        prefill = sum(c.num_tokens for c in chunks if c.start < c.request.num_prompt_tokens)
        self.records.append(StepRecord(1e3 * (stats.step_time_s - wall), 1e3 * (stats.host_time_s - host),
                                       decodes, prefill))
        self._events.append(self._launched)
        self._launched = None
        return result

    def detach(self) -> None:
        """Restore the engine's methods and, on CUDA, read the events (after the device has finished)."""
        self.core.scheduler.schedule, self.core.step = self._schedule, self._step
        if self._launch is None:
            return
        del self._runner.launch  # the instance attribute; the class's method shows through again
        import torch

        torch.cuda.synchronize()
        previous_end = None
        for record, events in zip(self.records, self._events):
            if events is None:
                continue
            start, end = events
            record.device_ms = start.elapsed_time(end)
            if previous_end is not None:
                record.idle_ms = max(0.0, previous_end.elapsed_time(start))
            previous_end = end

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump([asdict(r) for r in self.records], f)


def step_kind(record: StepRecord) -> str:
    """"with prefill", or the decode-only step's batch size bucket ("decode 129-256")."""
    if record.num_prefill_tokens:
        return "with prefill"
    low, high = next(b for b in _DECODE_BUCKETS if b[0] <= max(record.num_decodes, 1) <= b[1])
    return f"decode {low}-{high}" if high < (1 << 30) else f"decode {low}+"


def summarise(records: list[StepRecord]) -> list[dict[str, Any]]:
    """One row per kind of step: how many, their total and mean wall time, and the host's mean share."""
    groups: dict[str, list[StepRecord]] = {}
    for r in records:
        groups.setdefault(step_kind(r), []).append(r)
    rows = []
    for key, group in groups.items():
        wall = sum(r.wall_ms for r in group)
        rows.append({
            "kind": key, "steps": len(group), "total_s": wall / 1e3, "mean_ms": wall / len(group),
            "mean_host_ms": sum(r.host_ms for r in group) / len(group), "max_ms": max(r.wall_ms for r in group),
            "device_s": sum(r.device_ms for r in group) / 1e3, "idle_s": sum(r.idle_ms for r in group) / 1e3,
        })
    return rows


def format_summary(rows: list[dict[str, Any]]) -> str:
    """The table; the device columns only where events were recorded (CUDA)."""
    with_device = any(row.get("device_s") for row in rows)
    header = f"{'steps':>16} {'count':>6} {'total s':>8} {'mean ms':>8} {'host ms':>8} {'max ms':>8}"
    lines = [header + (f" {'device s':>9} {'idle s':>7}" if with_device else "")]
    for row in rows:
        line = (f"{row['kind']:>16} {row['steps']:>6} {row['total_s']:>8.2f} {row['mean_ms']:>8.2f} "
                f"{row['mean_host_ms']:>8.2f} {row['max_ms']:>8.1f}")
        if with_device:
            line += f" {row.get('device_s', 0.0):>9.2f} {row.get('idle_s', 0.0):>7.2f}"
        lines.append(line)
    return "\n".join(lines)


class JitWatch:
    """Counts Triton kernel compilations and TorchDynamo recompiles between ``start`` and ``stop``."""

    def __init__(self) -> None:
        self.triton: Counter[str] = Counter()
        self._previous_hook: Any = None
        self._dynamo_before = 0
        self.dynamo_recompiles = 0

    @staticmethod
    def _dynamo_count() -> int:
        try:
            from torch._dynamo.utils import counters
        except ImportError:
            return 0
        return counters["frames"]["ok"]  # frames compiled (first compiles and recompiles alike)

    def start(self) -> None:
        try:
            from triton import knobs
        except ImportError:
            knobs = None
        if knobs is not None:
            self._previous_hook = knobs.runtime.jit_post_compile_hook

            def hook(*args: Any, fn: Any = None, **kwargs: Any) -> None:
                self.triton[getattr(fn, "name", "?")] += 1
                if self._previous_hook is not None:
                    self._previous_hook(*args, fn=fn, **kwargs)

            knobs.runtime.jit_post_compile_hook = hook
        self._dynamo_before = self._dynamo_count()

    def stop(self) -> None:
        self.dynamo_recompiles = self._dynamo_count() - self._dynamo_before
        try:
            from triton import knobs
        except ImportError:
            return
        knobs.runtime.jit_post_compile_hook = self._previous_hook

    def describe(self) -> str:
        triton = ", ".join(f"{name} x{n}" for name, n in self.triton.most_common()) or "none"
        return f"Triton compiles {triton}; TorchDynamo frames compiled {self.dynamo_recompiles}"


class GcWatch:
    """Python's garbage collections between ``start`` and ``stop``: how many per generation, the total pause and the
    longest one. A collection stops the host; a long one in a step loop can leave the device idle."""

    def __init__(self) -> None:
        self.counts = [0, 0, 0]
        self.total_ms = 0.0
        self.longest_ms = 0.0
        self._started_at = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started_at = time.perf_counter()
            return
        pause_ms = 1e3 * (time.perf_counter() - self._started_at)
        self.counts[info["generation"]] += 1
        self.total_ms += pause_ms
        self.longest_ms = max(self.longest_ms, pause_ms)

    def start(self) -> None:
        gc.callbacks.append(self._callback)

    def stop(self) -> None:
        gc.callbacks.remove(self._callback)

    def describe(self) -> str:
        return (f"{self.counts[0]} / {self.counts[1]} / {self.counts[2]} collections of generation 0 / 1 / 2, "
                f"{self.total_ms:.1f} ms in all, longest {self.longest_ms:.1f} ms")

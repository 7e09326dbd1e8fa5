"""Both step loops (``LLM.generate`` and the engine-core process's) block instead of stepping an empty engine while
the only request left waits for its grammar to compile.

The compile is held until the loop has blocked a few times, or until it has stepped far more often than it blocked
(a loop that spins), so neither a working nor a broken loop waits on the clock."""
from __future__ import annotations

import os
import threading
from collections.abc import Callable
from multiprocessing import Pipe
from typing import Any

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.engine import messages as msg
from nanovllm.engine.core_proc import _CoreLoop
from nanovllm.sampling_params import StructuredOutputsParams
from server_helpers import startup_limit_s

pytest.importorskip("xgrammar")

WAITS_HELD = 3  # the loop blocks this often while the compile is held
SPIN = 200  # stalled steps with no block between them that mean the loop spins
PARAMS = SamplingParams(temperature=0, max_tokens=8,
                        structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))


class _Watch:
    """Holds the engine's grammar compiles and counts, while they are held, the steps that could make no progress
    (nothing in flight, no step run, no output) and the blocks of the loop."""

    def __init__(self, core: Any) -> None:
        self.core = core
        self.gate = threading.Event()
        self.stalled_steps = 0
        self.waits = 0
        self.unblocked_run = 0  # stalled steps since the last block
        self.longest_unblocked_run = 0
        manager, compile_ = core.structured, core.structured._compile

        def held(*args: Any) -> Any:
            self.gate.wait(startup_limit_s())
            return compile_(*args)

        manager._compile = held
        step = core.step

        def counted_step() -> Any:
            steps_before = core.stats.num_steps
            outputs = step()
            if not self.gate.is_set() and not outputs and core.stats.num_steps == steps_before and not core.in_flight:
                self.stalled_steps += 1
                self.unblocked_run += 1
                self.longest_unblocked_run = max(self.longest_unblocked_run, self.unblocked_run)
                if self.unblocked_run >= SPIN:
                    self.gate.set()
            return outputs

        core.step = counted_step

    def wrap_wait(self, wait: Callable[..., Any]) -> Callable[..., Any]:
        def counted_wait(*args: Any, **kwargs: Any) -> Any:
            if not self.gate.is_set() and self.unblocked_run:  # (an idle loop's wait for work is not counted)
                self.waits += 1
                self.unblocked_run = 0
                if self.waits >= WAITS_HELD:
                    self.gate.set()
            return wait(*args, **kwargs)

        return counted_wait

    def assert_blocked(self) -> None:
        assert self.stalled_steps >= WAITS_HELD, "the compile was held, yet the loop never stalled"
        assert self.longest_unblocked_run <= 1, f"{self.longest_unblocked_run} stalled steps without a block"


@pytest.fixture()
def llm(qwen3_dir: str) -> LLM:
    return LLM(qwen3_dir, device="cpu", dtype="float32", max_model_len=128, structured_outputs_backend="xgrammar")


def test_llm_generate_waits_for_the_grammar(llm: LLM) -> None:
    core = llm.engine.core
    watch = _Watch(core)
    core.wait_for_grammars = watch.wrap_wait(core.wait_for_grammars)
    out = llm.generate([[5, 6, 7]], PARAMS, use_tqdm=False)
    watch.assert_blocked()
    assert out[0].outputs[0].text in ("yes", "no")


def test_the_engine_core_process_loop_waits_for_input(llm: LLM) -> None:
    core = llm.engine.core
    watch = _Watch(core)
    inbox, to_core = Pipe(duplex=False)
    from_core, outbox = Pipe(duplex=False)
    loop = _CoreLoop(core, inbox, outbox, os.getppid())
    loop._wait_for_input = watch.wrap_wait(loop._wait_for_input)  # type: ignore[method-assign]
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        request = llm.engine.input_processor.process("0", [5, 6, 7], PARAMS)
        to_core.send(msg.AddRequests(request.engine_requests))
        finish = None
        while finish is None:
            assert from_core.poll(startup_limit_s()), "no output from the engine core loop in time"
            reply = from_core.recv()
            assert not isinstance(reply, (msg.RequestFailed, msg.CoreFailed)), reply
            finish = next((o.finish_reason for o in getattr(reply, "outputs", ()) if o.finish_reason), None)
    finally:
        to_core.send(msg.Shutdown())
        thread.join(startup_limit_s())
    assert not thread.is_alive()
    watch.assert_blocked()
    assert finish == "stop"

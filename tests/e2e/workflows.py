"""Workflows the end-to-end tests run (module-level, as users write them)."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any

from pydantic import BaseModel

from core.workflows import Retry, Step, StepContext, Workflow


class Numbers(BaseModel):
    """Input of the arithmetic workflows."""

    start: int
    times: int = 1


CALLS: Counter[tuple[str, str]] = Counter()
_calls_lock = threading.Lock()


def count_call(ctx: StepContext) -> None:
    """Record that this step's code ran once more for this execution."""
    with _calls_lock:
        CALLS[(ctx.execution_id, ctx.step_name)] += 1


linear = Workflow("linear", input_model=Numbers)


@linear.step()
def double(ctx: StepContext) -> int:
    count_call(ctx)
    return int(ctx.input.start) * 2


@linear.step(depends_on=["double"])
def add_one(ctx: StepContext, double: int) -> int:
    count_call(ctx)
    return double + 1


@linear.step(depends_on=["add_one"])
def describe(ctx: StepContext, add_one: int) -> dict[str, Any]:
    return {"result": add_one, "attempt": ctx.attempt}


diamond = Workflow("diamond", input_model=Numbers)


@diamond.step()
def source(ctx: StepContext) -> int:
    return int(ctx.input.start)


def _finish_on_the_tick() -> None:
    # Both branches sleep to the same 50 ms boundary, so that their completions (and
    # their decrements of the join's counter) land at the same moment.
    now = time.time()
    time.sleep(0.05 - now % 0.05)


@diamond.step(depends_on=["source"])
def left(ctx: StepContext, source: int) -> int:
    _finish_on_the_tick()
    return source + 1


@diamond.step(depends_on=["source"])
def right(ctx: StepContext, source: int) -> int:
    _finish_on_the_tick()
    return source + 2


@diamond.step(depends_on=["left", "right"])
def join(ctx: StepContext, left: int, right: int) -> int:
    JOIN_RUNS.append(ctx.execution_id)
    return left * right


JOIN_RUNS: list[str] = []

fan = Workflow("fan")
FAN_WIDTH = 50


@fan.step()
def split(ctx: StepContext) -> list[int]:
    return list(range(FAN_WIDTH))


def _branch(index: int) -> Any:
    def branch(ctx: StepContext, split: list[int]) -> int:
        return split[index] * split[index]

    branch.__name__ = f"square_{index}"
    return branch


for _i in range(FAN_WIDTH):
    fan.step(f"square_{_i}", depends_on=["split"])(_branch(_i))


def total(ctx: StepContext, **squares: int) -> int:
    return sum(squares.values())


fan.step("total", depends_on=[f"square_{i}" for i in range(FAN_WIDTH)])(total)


flaky = Workflow("flaky")
FLAKY_CALLS: dict[str, int] = {}
_flaky_lock = threading.Lock()


class Glitch(Exception):
    """A transient failure the flaky step recovers from."""


@flaky.step(retry=Retry(max_attempts=3, backoff=0.05, retry_on=(Glitch,)))
def sometimes(ctx: StepContext) -> str:
    with _flaky_lock:
        FLAKY_CALLS[ctx.execution_id] = FLAKY_CALLS.get(ctx.execution_id, 0) + 1
    if ctx.attempt < 3:
        raise Glitch(f"attempt {ctx.attempt} glitched")
    return f"ok on attempt {ctx.attempt}"


broken = Workflow("broken")


@broken.step()
def fine(ctx: StepContext) -> int:
    return 1


@broken.step(depends_on=["fine"], retry=Retry(max_attempts=2, backoff=0.01, retry_on=(KeyError,)))
def explode(ctx: StepContext, fine: int) -> int:
    raise ValueError("the data is bad")


@broken.step(depends_on=["explode"])
def never(ctx: StepContext, explode: int) -> int:
    return explode


slow = Workflow("slow")
SLOW_STARTED = threading.Event()


@slow.step()
def wait_for_cancel(ctx: StepContext) -> str:
    SLOW_STARTED.set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if ctx.is_cancelled():
            return "saw cancellation"
        time.sleep(0.05)
    return "timed out waiting"


@slow.step(depends_on=["wait_for_cancel"])
def after(ctx: StepContext, wait_for_cancel: str) -> str:
    return wait_for_cancel


class Token(BaseModel):
    """Input naming the run, so a test can break it before it starts."""

    token: str


recovering = Workflow("recovering", input_model=Token)
BROKEN: set[str] = set()  # tokens whose risky step should fail


@recovering.step()
def prepare(ctx: StepContext) -> str:
    count_call(ctx)
    return "prepared"


@recovering.step(depends_on=["prepare"])
def risky(ctx: StepContext, prepare: str) -> str:
    count_call(ctx)
    if ctx.input.token in BROKEN:
        raise RuntimeError("the downstream service is down")
    return prepare + "+risky"


@recovering.step(depends_on=["risky"])
def conclude(ctx: StepContext, risky: str) -> str:
    return risky + "+done"


limited = Workflow("limited", max_concurrency=2)
OVERLAP = {"now": 0, "max": 0}
_overlap_lock = threading.Lock()


@limited.step()
def occupy(ctx: StepContext) -> int:
    with _overlap_lock:
        OVERLAP["now"] += 1
        OVERLAP["max"] = max(OVERLAP["max"], OVERLAP["now"])
    time.sleep(0.1)
    with _overlap_lock:
        OVERLAP["now"] -= 1
    return 1


serial = Workflow("serial", max_concurrency=1)
STARTED: list[str] = []


@serial.step()
def record_start(ctx: StepContext) -> str:
    STARTED.append(ctx.execution_id)
    return ctx.execution_id


ordered = Workflow("ordered")
ORDER: list[str] = []


@ordered.step()
def note(ctx: StepContext) -> str:
    ORDER.append(ctx.execution_id)
    return ctx.execution_id


sleepy = Workflow("sleepy")


@sleepy.step(soft_timeout=0.5, timeout=10, retry=Retry(max_attempts=2, backoff=0.01))
def overrun(ctx: StepContext) -> str:
    time.sleep(5)
    return "finished late"


crashy = Workflow("crashy")
# The default Retry (one attempt): a worker's death is a crash recovery, not a retry.


@crashy.step()
def hang_first_time(ctx: StepContext) -> int:
    if ctx.attempt == 1:
        time.sleep(120)  # the test kills the worker here
    return ctx.attempt


@crashy.step(depends_on=["hang_first_time"])
def after_crash(ctx: StepContext, hang_first_time: int) -> str:
    return f"recovered on attempt {hang_first_time}"


patient = Workflow("patient")
MIDDLE_STARTED = threading.Event()


@patient.step()
def begin(ctx: StepContext) -> int:
    count_call(ctx)
    return 1


@patient.step(depends_on=["begin"])
def middle(ctx: StepContext, begin: int) -> int:
    count_call(ctx)
    MIDDLE_STARTED.set()
    time.sleep(2)  # the test restarts the database meanwhile
    return begin + 1


@patient.step(depends_on=["middle"])
def end(ctx: StepContext, middle: int) -> int:
    count_call(ctx)
    return middle + 1


stuck = Workflow("stuck")


@stuck.step(timeout=1.0)
def past_hard_limit(ctx: StepContext) -> str:
    time.sleep(30)  # Celery kills the pool process after 1 s
    return "never"


gate = Workflow("gate", max_concurrency=1)


@gate.step()
def hold(ctx: StepContext) -> str:
    """Holds the workflow's only slot until its execution is cancelled or times out."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if ctx.is_cancelled():
            return "released"
        time.sleep(0.05)
    return "held to the end"


relay = Workflow("relay")
RELAY_STARTED = threading.Event()
RELAY_RELEASE = threading.Event()


@relay.step()
def hand_over(ctx: StepContext) -> str:
    count_call(ctx)
    return "handed over"


@relay.step(depends_on=["hand_over"])
def carry(ctx: StepContext, hand_over: str) -> str:
    """Runs continued from hand_over. With input {"wait": true} it waits for a
    cancellation or RELAY_RELEASE; with {"hang": true} it hangs on attempt 1 (a test
    kills its worker there)."""
    count_call(ctx)
    RELAY_STARTED.set()
    if ctx.attempt == 1 and ctx.input == {"hang": True}:
        time.sleep(120)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and ctx.input == {"wait": True}:
        if ctx.is_cancelled():
            return "saw cancellation"
        if RELAY_RELEASE.is_set():
            break
        time.sleep(0.05)
    return hand_over + ", carried"


def _chain(name: str, length: int, pause: float) -> Workflow:
    workflow = Workflow(name)
    previous: tuple[str, ...] = ()
    for index in range(length):
        step_name = f"s{index:02d}"

        def run(ctx: StepContext, **upstream: Any) -> int:
            count_call(ctx)
            time.sleep(pause)
            return len(upstream)

        workflow.add_step(Step(name=step_name, fn=run, depends_on=previous))
        previous = (step_name,)
    return workflow


long_chain = _chain("long_chain", 12, 0.02)
quick = Workflow("quick")


@quick.step()
def at_once(ctx: StepContext) -> str:
    count_call(ctx)
    return "done"


short_chain = _chain("short_chain", 4, 0.005)


chatty = Workflow("chatty")
chatty_log = logging.getLogger("tests.e2e.chatty")


@chatty.step()
def speak(ctx: StepContext) -> str:
    chatty_log.info("speaking for %s", ctx.execution_id)
    return "said"


@chatty.step(depends_on=["speak"])
def listen(ctx: StepContext, speak: str) -> str:
    chatty_log.info("heard %s", speak)
    return speak


unstorable = Workflow("unstorable")
# What the step returns, by its input's "kind" ("oversize": "size" characters of text).
UNSTORABLE: dict[str, Any] = {"nul": "a\x00b", "set": {1, 2}, "nan": float("nan")}


# Every error earns a retry here: an output that cannot be stored must get none.
@unstorable.step(retry=Retry(max_attempts=3, backoff=0.01))
def produce(ctx: StepContext):  # type: ignore[no-untyped-def]  # no annotation: checked as returned
    count_call(ctx)
    if ctx.input["kind"] == "oversize":
        return "x" * ctx.input["size"]
    return UNSTORABLE[ctx.input["kind"]]


@unstorable.step(depends_on=["produce"])
def consume(ctx: StepContext, produce: Any) -> str:
    return "never"


nul_error = Workflow("nul_error")


@nul_error.step()
def complain(ctx: StepContext) -> str:
    count_call(ctx)
    raise ValueError("bad byte \x00 in the record")


pair = Workflow("pair")


@pair.step()
def one(ctx: StepContext) -> int:
    count_call(ctx)
    return 1


@pair.step()
def two(ctx: StepContext) -> int:
    count_call(ctx)
    return 2


@pair.step(depends_on=["one", "two"])
def joined(ctx: StepContext, one: int, two: int) -> int:
    return one + two


# Each step runs longer than the continuation bound its test sets.
lingering = _chain("lingering", 2, 0.3)

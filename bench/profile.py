"""Where a conveyor worker's CPU goes: py-spy samples of its processes on a workload.

    python -m bench.profile [--shape chain10|fanout|map1k|map10k|limit_chain10|keyed]
                            [--executions 300] [--out DIR]

``limit_chain10`` is chain10 with every step under a limit that never binds, ``keyed``
the keys scenario's one-step workflow under a limit of 1 per key (10 executions a key,
submitted a key's together).

It starts PostgreSQL and Redis as ``make bench`` does, then the same prefork worker as
the comparison's conveyor. After a warm-up, py-spy samples the worker's processes while
the executions run. The report lists the functions with the largest share of samples,
inclusive and self. The raw collapsed stacks are kept in DIR, readable by speedscope
or ``flamegraph.pl``, for a closer look.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from bench import workflows
from bench.harness import BenchError, note, services
from bench.processes import ROOT
from bench.systems import CHAIN10, FANOUT, Conveyor, Shape, map_shape

# py-spy's raw format: "frame;frame;...;frame count", a frame "function (file:line)".
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^():]+)(?::\d+)?\)$")
LIMITED_CHAIN10 = Shape("limit_chain10", "chain", workflows.CHAIN_STEPS)
KEYED = Shape("keyed", "chain", 1)
SHAPES = {
    shape.name: shape
    for shape in (CHAIN10, FANOUT, map_shape(1000), map_shape(10_000), LIMITED_CHAIN10, KEYED)
}
PER_KEY = 10
_OWN = ("(core/", "(worker/", "(bench/workflows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="chain10", help="(chain10)")
    parser.add_argument("--executions", type=int, default=300, help="executions (300)")
    parser.add_argument("--concurrency", type=int, default=2, help="pool processes (2)")
    parser.add_argument("--rate", type=int, default=200, help="samples a second (200)")
    parser.add_argument("--top", type=int, default=30, help="functions listed (30)")
    parser.add_argument("--out", type=Path, default=None, help="where to keep the stacks")
    options = parser.parse_args()
    # The venv's scripts are beside its interpreter even when the venv is not activated.
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        raise SystemExit("py-spy is not installed: pip install '.[bench]' (or the dev extras)")
    folder = options.out or Path(tempfile.mkdtemp(prefix="conveyor-profile-"))
    folder.mkdir(parents=True, exist_ok=True)
    stacks = folder / "stacks.txt"
    shape = SHAPES[options.shape]
    with services() as running:
        system = Conveyor(running, folder, options.concurrency, long_steps=20)
        try:
            with system.workers() as workers:
                warm = system.submit(CHAIN10, 4 * options.concurrency)
                system.wait(warm, 120)
                command = [spy, "record", "--pid", str(workers.pids[0]), "--subprocesses"]
                # Samples of threads holding the GIL only: CPU spent in Python, not waits
                # on the database or the broker (py-spy counts some waits as active).
                command += ["--gil", "--rate", str(options.rate), "--format", "raw"]
                command += ["-o", str(stacks)]
                recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL)
                try:
                    if shape is LIMITED_CHAIN10:
                        inputs = [{"i": index} for index in range(options.executions)]
                        name = workflows.LIMITED_CHAIN
                        submission = system.submit_inputs(shape, name, inputs)
                    elif shape is KEYED:
                        keyed = [
                            {"key": f"k{index // PER_KEY}", "i": index}
                            for index in range(options.executions)
                        ]
                        submission = system.submit_inputs(shape, workflows.KEYED, keyed)
                    else:
                        submission = system.submit(shape, options.executions)
                    system.wait(submission, 600)
                    system.check(submission)
                finally:
                    recorder.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                    if recorder.wait(timeout=60) != 0:
                        raise BenchError(f"py-spy exited with {recorder.returncode}")
        finally:
            system.close()
    report(stacks, options.top, options.executions * shape.steps)
    note(f"stacks: {stacks}")


def report(stacks: Path, top: int, steps: int) -> None:
    """Print the functions with the most samples, inclusive and self."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in stacks.read_text().splitlines():
        path, _, count_text = line.rpartition(" ")
        if not path:
            continue
        count = int(count_text)
        frames = [name for frame in path.split(";") if (name := _name(frame)) is not None]
        if not frames:
            continue
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    if total == 0:
        raise BenchError("py-spy recorded no samples")
    note(f"{total} samples over {steps} steps, as shares of all samples")
    print("conveyor's functions, inclusive (with what they call):")
    for frame, count in [(f, c) for f, c in inclusive.most_common() if _is_own(f)][:top]:
        print(f"  {100 * count / total:5.1f}%  {frame}")
    print("every function, self (where the samples were taken):")
    for frame, count in own.most_common(top):
        print(f"  {100 * count / total:5.1f}%  {frame}")


def _is_own(frame: str) -> bool:
    return any(part in frame for part in _OWN)


def _name(frame: str) -> str | None:
    """``function (file)`` with the file shortened to its package path; None for the
    process and thread frames py-spy adds."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return None
    file = match["file"]
    for anchor in ("site-packages/", f"{ROOT}/", "/lib/python3"):
        if anchor in file:
            file = file.split(anchor, 1)[1]
            break
    return f"{match['function']} ({file})"


if __name__ == "__main__":
    main()

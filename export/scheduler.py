"""Which process exports which graph: the component jobs one after another in this process (one
worker), or one graph per task in spawned worker processes, longest first, with each worker's
progress lines relayed as they come.

No state lives in module globals. The parent holds a `_Worker` per process (its pipe and the task
it is on) and hands out the next task when one reports back; a worker's own state, the component it
loaded last, lives in its loop (`_worker_main`). A worker that dies without reporting fails the
export instead of leaving the parent waiting for it.

The torch-side modules are imported where a job runs: importing export.package (for GRAPHS or the
options) does not import torch.
"""

from __future__ import annotations

import os
import pickle
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable

from glm_image_onnx.export.options import LARGE_CHECKPOINT, ExportError, ExportOptions, ExportRun, checkpoint_bytes
from glm_image_onnx.manifest import Graph
from glm_image_onnx.models.inspect import CheckpointInfo

# Export + verify seconds per graph (bench preset, one thread per worker): the workers are handed
# the longest first.
_GRAPH_COST = {"dit_decoder": 24, "ar_planner": 15, "dit_condition_write": 10, "vae_decoder": 7,
               "vae_encoder": 6, "glyph_encoder": 6, "vision_tokenizer": 5}

Job = tuple[str, list[str]]  # a checkpoint folder and the graphs wanted of it


def default_jobs(info: CheckpointInfo) -> int:
    """Components export in parallel processes only while several fit in memory at once: a small
    checkpoint on a multi-core machine gets 2 workers, a real 9B/7B one exports one at a time."""
    return 2 if (os.cpu_count() or 1) >= 2 and checkpoint_bytes(info) < LARGE_CHECKPOINT else 1


def run_jobs(jobs: list[Job], run: ExportRun, workers: int) -> dict[str, Graph]:
    """Every wanted graph's manifest entry, exported here (one worker) or by `workers` processes."""
    if workers == 1:
        return _run_here(jobs, run)
    from glm_image_onnx.export.component_export import share_component_weights

    # One task per graph rather than per component: the DiT alone is ~45% of the work, so whole
    # components cannot be split evenly between two workers. Longest first (LPT); a worker keeps
    # the component it loaded last, so a component's graphs that land on one worker share a load.
    tasks = sorted(((folder, name) for folder, wanted in jobs for name in wanted),
                   key=lambda t: -_GRAPH_COST.get(t[1], 1))
    results = _run_workers(tasks, run, workers)
    for folder, wanted in jobs:  # once all of a component's graphs exist, whichever worker wrote them
        results.update(share_component_weights(folder, {g: results[g] for g in wanted}, run))
    return results


def _run_here(jobs: list[Job], run: ExportRun) -> dict[str, Graph]:
    from glm_image_onnx.export.component_export import export_component
    from glm_image_onnx.export.low_memory import export_component_streamed

    export = export_component_streamed if run.options.low_memory else export_component
    results: dict[str, Graph] = {}
    for folder, wanted in jobs:
        results.update(export(folder, wanted, run))
    return results


def _run_workers(tasks: list[tuple[str, str]], run: ExportRun, workers: int) -> dict[str, Graph]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # torch and fork do not mix
    threads = max(1, (os.cpu_count() or 1) // workers)
    pending = deque(tasks)
    pool: list[_Worker] = []
    results: dict[str, Graph] = {}
    try:
        for _ in range(workers):
            pool.append(_Worker.start(ctx, run, threads))
            pool[-1].next_task(pending)
        while busy := {w.conn: w for w in pool if w.task is not None}:
            for conn in wait(list(busy)):
                done = busy[conn].receive(run.log)
                if done is not None:
                    results[done[0]] = done[1]
                    busy[conn].next_task(pending)
    finally:
        # Stopped, not waited for while they tear down interpreters full of traced models (1-3 s
        # each after their last task; their files are closed and their results sent by then).
        for w in pool:
            w.stop()
    return results


class _WorkerTraceback(Exception):
    """Where a worker's error was raised: the cause of the error the parent raises again."""

    def __str__(self) -> str:
        return f'\n"""\n{self.args[0]}"""'


@dataclass
class _Worker:
    """The parent's handle on one worker process: its end of the pipe and its task (None: idle)."""

    process: Any
    conn: Connection
    task: tuple[str, str] | None = None

    @classmethod
    def start(cls, ctx: Any, run: ExportRun, threads: int) -> "_Worker":
        here, there = ctx.Pipe()
        process = ctx.Process(target=_worker_main, daemon=True,
                              args=(there, run.root, run.tmp, run.options, run.steps, threads))
        process.start()
        there.close()  # the worker holds the only other end now: its exit reads as EOF here
        return cls(process, here)

    def next_task(self, pending: deque[tuple[str, str]]) -> None:
        self.task = pending.popleft() if pending else None
        if self.task is not None:
            self.conn.send(self.task)

    def receive(self, log: Callable[[str], None]) -> tuple[str, Graph] | None:
        """The worker's next message: a progress line (logged), or its task's (name, entry);
        the worker's error is raised again here."""
        try:
            kind, *body = self.conn.recv()
        except (EOFError, ConnectionError):  # a reset where the worker died with a task unread
            self.process.join(5)
            raise ExportError(f"the export worker for {self.task[1] if self.task else 'a graph'} stopped "
                              f"(exit code {self.process.exitcode}) without a result") from None
        if kind == "log":
            log(body[0])
            return None
        if kind == "error":
            raise body[0] from _WorkerTraceback(body[1])
        return body[0], body[1]

    def stop(self) -> None:
        self.process.terminate()
        self.process.join()
        self.conn.close()


def _worker_main(conn: Connection, root: Path, tmp: Path, options: ExportOptions, steps: dict[str, str],
                 threads: int) -> None:
    """A worker process: export the (folder, graph) tasks the parent sends until it stops this
    process; progress lines, results and the first error go back through `conn`, in order."""
    import torch

    from glm_image_onnx.export.component_export import LoadedComponent

    torch.set_num_threads(threads)  # the workers share the cores
    run = ExportRun(root, tmp, options, steps, log=lambda line: conn.send(("log", line)))
    loaded = LoadedComponent()
    while True:
        try:
            folder, name = conn.recv()
        except (EOFError, ConnectionError):  # the parent is gone
            return
        try:
            conn.send(("done", name, loaded.export_graph(folder, name, run)))
        except Exception as e:
            conn.send(("error", _portable(e), traceback.format_exc()))
            return


def _portable(error: Exception) -> Exception:
    """`error`, or an ExportError with its type and message where it would not survive the pipe."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return ExportError(f"{type(error).__name__}: {error}")

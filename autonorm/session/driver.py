"""The session's parent process: each phase in a process of its own under its share of the budget,
then the summary. It makes no CUDA call (torch comes with the package's import, the GPU is never
touched here), so nothing a phase does to the GPU can stop the summary."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .records import CASE_MARK, EXIT_OUT_OF_SHARE, append_line, now_iso, phase_file, read_lines
from .summary import summary

# (phase, weight), most valuable first: a phase's share is its weight's part of the budget left when it starts.
PHASES = (("env", 1), ("smoke-triton", 3), ("smoke-cupy", 2), ("smoke-numba", 2), ("bench", 5), ("variants", 2),
          ("tune", 4), ("sweep", 3))
PHASE_NAMES = tuple(name for name, _ in PHASES)
DEFAULT_BUDGET = 510.0
SUMMARY_RESERVE_S = 5.0  # kept back for the summary
MIN_SHARE_S = 1.0  # a share below this runs nothing: the phase is skipped
KILL_GRACE_S = 3.0  # a phase past its share gets SIGTERM, then SIGKILL after this
MAX_RESTARTS = 3


def unknown_phases(phases: list[str]) -> list[str]:
    return sorted(set(phases) - set(PHASE_NAMES))


def share_of(phase: str, phases_left: list[str], seconds_left: float) -> float:
    """Seconds `phase` may run: its weight's part, among the phases still to run (itself first), of the
    time left less the summary's reserve. A phase that ends early leaves its time to the later ones."""
    weights = dict(PHASES)
    return max(0.0, seconds_left - SUMMARY_RESERVE_S) * weights[phase] / sum(weights[p] for p in phases_left)


def outcome(exit_status: int, stopped_by: str | None, share_over: bool) -> str:
    """What one phase process's end means for the session (the status of its phase line)."""
    if stopped_by:
        return f"stopped by {stopped_by}"
    if exit_status == 0:
        return "done"
    if exit_status == EXIT_OUT_OF_SHARE or share_over:
        return "cut at the end of its share"
    return f"exit status {exit_status}"  # it died: restarted, skipping what it finished


class Session:
    """`phase_command`: the argv that runs one phase process, to which `NAME --out OUT --until EPOCH
    [--dry-run]` is appended (scripts/gpu_session.py names itself)."""

    def __init__(self, out: Path, budget: float, dry_run: bool, phases: list[str], phase_command: list[str]):
        self.out, self.budget, self.dry_run, self.phases = out, budget, dry_run, phases
        self.phase_command = phase_command
        self.started = time.monotonic()
        self.deadline = self.started + budget
        self.child: subprocess.Popen | None = None
        self.stopped_by: str | None = None
        self.log = None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, text: str) -> None:
        line = f"[session {time.monotonic() - self.started:6.1f}s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def _on_signal(self, signum, _frame):
        self.stopped_by = signal.Signals(signum).name
        self._stop_child()

    def _stop_child(self):
        child = self.child
        if child is not None and child.poll() is None:
            try:
                os.killpg(child.pid, signal.SIGTERM)  # the phase's process group: its compilers too
            except ProcessLookupError:
                pass  # it ended meanwhile

    def _env(self) -> dict:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.dry_run:
            env.update(TRITON_INTERPRET="1", NUMBA_ENABLE_CUDASIM="1")
        return env

    def _run_child(self, phase: str, until: float) -> tuple[int, str | None]:
        """(exit status, the case it was in when it ended) of one phase process."""
        cmd = [*self.phase_command, phase, "--out", str(self.out),
               "--until", f"{time.time() + until - time.monotonic():.3f}"] + (["--dry-run"] if self.dry_run else [])
        # A process group of its own (killed as one, compilers included), but not a session of its own:
        # whatever ends this command (a remote runner's timeout) still ends the phase with it.
        self.child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=self._env(), preexec_fn=os.setpgrp, errors="replace")
        current = [None]

        def pump():
            for line in self.child.stdout:
                if line.startswith(CASE_MARK):
                    current[0] = line[len(CASE_MARK):].strip()
                sys.stdout.write(line)
                sys.stdout.flush()
                self.log.write(line)
                self.log.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            self.child.wait(timeout=max(0.0, until - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._stop_child()
            try:
                self.child.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.child.pid, signal.SIGKILL)
                self.child.wait()
        reader.join(timeout=2)
        rc, self.child = self.child.returncode, None
        return rc, current[0]

    def _record_crash(self, phase: str, case: str | None, rc: int) -> None:
        """The process died inside `case`: record it so that the restart skips it."""
        finished = {r.get("case") for r in read_lines(phase_file(self.out, phase)) if r.get("phase") == phase}
        if case is None or case in finished:
            return
        crashed = {"phase": phase, "case": case, "status": "crashed",
                   "error": f"the phase process died (exit status {rc})", "date": now_iso()}
        if phase.startswith("smoke-"):
            crashed["backend"] = phase[len("smoke-"):]
        append_line(phase_file(self.out, phase), crashed)

    def run_phase(self, phase: str, phases_left: list[str]) -> None:
        share = share_of(phase, phases_left, self.left())
        started = time.monotonic()
        until = started + share
        self.say(f"phase {phase}: share {share:.0f}s of {self.left():.0f}s left")
        restarts, status, rc, case = 0, "skipped: no time left", 0, None
        while share >= MIN_SHARE_S:
            rc, case = self._run_child(phase, until)
            status = outcome(rc, self.stopped_by, time.monotonic() >= until - 0.5)
            if not status.startswith("exit status"):
                break
            self._record_crash(phase, case, rc)
            if restarts >= MAX_RESTARTS:
                break
            restarts += 1
            self.say(f"phase {phase}: {status} in case {case!r}; restarting, finished cases are kept")
        event = {"phase": phase, "case": f"phase {phase}", "event": "phase", "status": status, "exit_status": rc,
                 "seconds": round(time.monotonic() - started, 1), "share_s": round(share, 1),
                 "restarts": restarts, "date": now_iso()}
        if status != "done" and case is not None:
            event["last_case"] = case
        append_line(self.out / "session.jsonl", event)
        self.say(f"phase {phase}: {status} after {event['seconds']}s")

    def run(self) -> int:
        """Every phase in order, then the summary, printed last also after a cut or a signal; the exit
        status is 128 + the signal's number after one, else 0."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / "session.log", "a")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.say(f"out {self.out}, budget {self.budget:.0f}s, phases {', '.join(self.phases)}"
                 + (", DRY RUN (CPU)" if self.dry_run else ""))
        try:
            for i, phase in enumerate(self.phases):
                if self.stopped_by:
                    break
                self.run_phase(phase, self.phases[i:])
        finally:
            self._stop_child()
            try:
                text = summary(self.out)
            except Exception as exc:  # the files are on disk whatever happens here
                text = (f"gpu_session: the summary failed ({type(exc).__name__}: {exc}); "
                        f"the files in {self.out} are complete")
            self.log.write(text + "\n")
            self.log.close()
            print(text, flush=True)
        if self.stopped_by:
            return 128 + getattr(signal, self.stopped_by)
        return 0

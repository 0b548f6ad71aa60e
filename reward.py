"""Binary math reward with math-verify, the checker the paper used, bounded in time.

Rules that decide correctness (`score`), the paper's setting through verl's math-verify reward:
1. The gold answer is wrapped as `\\boxed{gold}` and parsed as LaTeX (so `\\frac12`, `0.5`, `50\\%`,
   intervals, tuples and sets are all understood).
2. The response is parsed with math-verify's expression and LaTeX extractors; a `\\boxed{}` answer takes
   priority, otherwise the last math expression that parses is used (math-verify's `first_match`).
   Several `\\boxed{}` answers are read together as one set (math-verify's `boxed="all"`), so a response
   that boxes two different answers matches neither.
3. `verify` compares the two symbolically and numerically (6 decimals); `x = 3` matches `3`, units and
   `\\text{}` wrappers are normalised away; equal sets/tuples/intervals match element-wise.
4. Anything else (no parsable answer, a parser error, a timeout) scores 0.0. Nothing ever raises.

One form skips the parser (`fast_score`): a response that is only `\\boxed{n}` against a gold that is a plain
integer, both of at most 9 ASCII digits with no leading zero, scores int(n) == int(gold). math-verify reads both
as that integer and compares them exactly, so the score is the same (tests/test_reward.py checks agreement
with math-verify on every gold of the shared benchmarks and the tiny data, on real tiny-model outputs, and on
near misses). It is the tiny default's answer format (99.7 % of its rollouts): scoring them costs microseconds
instead of a sympy parse in a worker process. Real responses (reasoning, then a box) always take math-verify.

`score_batch` runs `score` in worker processes, each item under a hard deadline: a worker stuck in sympy
is killed, replaced, and the item scores 0; the number of such timeouts comes back for logging. Workers
are fresh interpreters that import only this module (not the trainer, torch or CUDA), in their own session
and deaf to SIGINT and SIGTERM (a stop is the trainer's to handle), ending with the trainer; an item whose
worker is lost otherwise is scored again.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from multiprocessing.connection import wait

_GOLD_CFG = None
_PRED_CFG = None
_PARENT = None  # a worker's trainer (its pid), set on the worker's command line
RETRIES = 2  # a worker lost without reaching its deadline: its item is scored again up to this many times
START_FAILURES = 3  # per worker slot: workers in a row that die before they are ready: the pool cannot start
START_TIMEOUT_S = 120.0  # a worker not ready this long after its start (a hung import, a stalled file system) is
                         # killed and counts as one that died before it was ready


class Interrupted(Exception):
    """score_batch's `should_stop` said stop: the items are dropped; idle workers are kept, busy ones replaced."""


class _TimeoutLog(logging.Filter):
    """math-verify stops a slow parse or comparison itself, logs "Timeout during ...: <the whole input>"
    (possibly 200k characters) and answers "no match". Count those, and log only the start of the input."""

    count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg.startswith("Timeout during"):
            _TimeoutLog.count += 1
            record.msg, record.args = (msg[:120] + f"... ({len(msg)} characters)" if len(msg) > 150 else msg), ()
        return True


def _configs():
    global _GOLD_CFG, _PRED_CFG
    if _GOLD_CFG is None:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig

        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_TimeoutLog())
        _GOLD_CFG = [LatexExtractionConfig()]
        _PRED_CFG = [ExprExtractionConfig(), LatexExtractionConfig()]
    return _GOLD_CFG, _PRED_CFG


_INT = r"-?(?:0|[1-9][0-9]{0,8})"  # at most 9 digits: exact in sympy and in math-verify's float comparison
_PLAIN_INT = re.compile(_INT, re.ASCII)
_ONLY_BOXED_INT = re.compile(r"\s*\\boxed\{(" + _INT + r")\}\s*", re.ASCII)


def fast_score(response: str, gold: str) -> float | None:
    """math-verify's score for a response that is only `\\boxed{n}` (whitespace around it) and a gold that
    is a plain integer, both of at most 9 digits without a leading zero; None for anything else."""
    if not _PLAIN_INT.fullmatch(gold):
        return None
    m = _ONLY_BOXED_INT.fullmatch(response)
    return None if m is None else float(int(m.group(1)) == int(gold))


def score(response: str, gold: str, timeout: int = 5) -> float:
    """1.0 if the response's final answer equals `gold` (see the rules above), else 0.0."""
    fast = fast_score(str(response), str(gold))
    return fast if fast is not None else math_verify_score(response, gold, timeout)[0]


def math_verify_score(response: str, gold: str, timeout: int = 5) -> tuple[float, bool]:
    """(score, whether math-verify's own timeout stopped it), always through math-verify's parser."""
    from math_verify import parse, verify

    before = _TimeoutLog.count
    try:
        gold_cfg, pred_cfg = _configs()
        gold_parsed = parse("\\boxed{" + str(gold) + "}", gold_cfg, parsing_timeout=timeout)
        pred_parsed = parse(str(response), pred_cfg, parsing_timeout=timeout) if gold_parsed else None
        ok = bool(pred_parsed) and verify(gold_parsed, pred_parsed, timeout_seconds=timeout)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # noqa: BLE001  math-verify's TimeoutException is a BaseException; model output never crashes training
        ok = False
    return (1.0 if ok else 0.0), _TimeoutLog.count > before


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """(content, end) of the first balanced {...} at or after `start` (end: just past the closing brace)."""
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j], j + 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) with balanced braces, or None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    found = _braced(text, start) if start >= 0 else None
    return found[0] if found else None


def extract_all_boxed(text: str) -> list[str]:
    """Contents of every `\\boxed{...}` (or `\\fbox{...}`) with balanced braces, in order (a box
    nested in another is part of the outer one)."""
    out, pos = [], 0
    while True:
        starts = [i for i in (text.find("\\boxed", pos), text.find("\\fbox", pos)) if i >= 0]
        found = _braced(text, min(starts)) if starts else None
        if found is None:
            return out
        out.append(found[0])
        pos = found[1]


# ----------------------------------------------------------------------------------------------
# Parallel scoring with a hard per-item deadline


def _serve():
    """Worker process main: (index, response, gold) in on stdin, (index, score) out on the saved stdout.
    Deaf to the stop signals meant for the trainer (Ctrl-C, a SIGTERM sent to every process of a job step):
    the trainer decides what a stop means; a worker ends with its trainer (PR_SET_PDEATHSIG on Linux, and
    the end of its stdin)."""
    import signal
    from multiprocessing.connection import Connection

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: killed when the parent dies
        if os.getppid() != _PARENT:  # the parent died before prctl took effect
            return
    out = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)  # anything the checker prints goes to stderr, not into the protocol
    inp = Connection(os.dup(0), writable=False)
    _configs()
    out.send("ready")
    while True:
        try:
            item = inp.recv()
        except EOFError:
            return
        if item is None:
            return
        i, response, gold, timeout = item
        out.send((i, *math_verify_score(response, gold, timeout)))  # score_batch tried fast_score already


class Scores(list):
    """A list of scores with `.timeouts`, the number of items that hit the deadline (scored 0: the checker ran
    and found no answer in time), and `.unscored`, the indices of items never scored because their worker was
    lost RETRIES + 1 times (their 0 is a placeholder: the trainer leaves them out of the counts and the loss)."""

    def __init__(self, scores=()):
        super().__init__(scores)
        self.timeouts, self.unscored = 0, []


class _Worker:
    """One scoring process (a fresh interpreter importing only this module and math-verify)."""

    def __init__(self):
        from multiprocessing.connection import Connection

        here = os.path.dirname(os.path.abspath(__file__))
        code = (f"import sys; sys.path.insert(0, {here!r}); import reward; reward._PARENT = {os.getpid()}; "
                "reward._serve()")
        # its own session: a terminal's Ctrl-C and a signal to the trainer's process group do not reach it
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     start_new_session=True)
        self.send_conn = Connection(os.dup(self.proc.stdin.fileno()), readable=False)
        self.recv_conn = Connection(os.dup(self.proc.stdout.fileno()), writable=False)
        self.proc.stdin.close()
        self.proc.stdout.close()
        self.ready, self.started = False, time.monotonic()
        self.item = None  # (index, deadline) of the item in flight

    def kill(self):
        self.proc.kill()
        self.proc.wait()
        self.send_conn.close()
        self.recv_conn.close()


class ScorePool:
    """`workers` scoring processes; a stuck or dead one is killed and replaced."""

    def __init__(self, workers: int):
        self.workers = [_Worker() for _ in range(max(1, workers))]
        self.start_failures = 0  # workers in a row that died before they were ready

    def map(self, responses, golds, timeout: float, should_stop=None) -> Scores:
        """Scores in input order. An item whose worker dies before the deadline (killed from outside, out of
        memory) is scored again by another worker, up to RETRIES times, then is listed in `.unscored` (its 0 is
        no score): a lost worker never turns an unscored item into a 0 silently. Workers that die before they
        are ready, or are not ready START_TIMEOUT_S after their start, START_FAILURES times per worker slot in a
        row with none ready in between, close the pool and fail the call with the reason (e.g. math-verify
        missing). `should_stop()` is asked at least once a second; True raises Interrupted (workers busy with
        a dropped item are replaced: the next call finds them idle)."""
        out = Scores([0.0] * len(responses))
        todo = list(range(len(responses)))[::-1]
        lost = [0] * len(responses)

        def again(w):  # the worker died with its item unscored
            if w.item is not None:
                i = w.item[0]
                lost[i] += 1
                if lost[i] <= RETRIES:
                    todo.append(i)
                else:
                    out.unscored.append(i)
            self.start_failures = 0 if w.ready else self.start_failures + 1
            if self.start_failures >= START_FAILURES * len(self.workers):  # every slot, again and again
                failures = self.start_failures
                self.close()
                raise RuntimeError(f"answer-checking workers cannot start ({failures} in a row died before they were "
                                   f"ready): {_start_error()}")
            self._replace(w)

        while todo or any(w.item for w in self.workers):
            if should_stop is not None and should_stop():
                for w in [w for w in self.workers if w.item]:
                    self._replace(w)
                raise Interrupted()
            for w in self.workers:
                if w.ready and w.item is None and todo:
                    i = todo.pop()
                    w.item = (i, time.monotonic() + timeout)
                    try:
                        # math-verify's own timeout (half the deadline) fires first where it can, which
                        # keeps the worker; the deadline kills a worker stuck where it cannot
                        w.send_conn.send((i, str(responses[i]), str(golds[i]), max(1, int(timeout / 2))))
                    except OSError:  # died between items
                        again(w)
            deadlines = [w.item[1] for w in self.workers if w.item]
            deadlines += [w.started + START_TIMEOUT_S for w in self.workers if not w.ready]
            wait_s = min(1.0, max(0.0, min(deadlines, default=1e9) - time.monotonic()))
            ready = wait([w.recv_conn for w in self.workers], timeout=wait_s)
            for w in list(self.workers):
                if w.recv_conn in ready:
                    try:
                        msg = w.recv_conn.recv()
                    except (EOFError, OSError):  # the worker died
                        again(w)
                        continue
                    if msg == "ready":
                        w.ready, self.start_failures = True, 0
                    else:
                        out[msg[0]] = float(msg[1])
                        out.timeouts += int(msg[2])  # stopped by math-verify's own timeout
                        w.item = None
                elif w.item and time.monotonic() >= w.item[1]:  # stuck past its deadline
                    out.timeouts += 1
                    self._replace(w)
                elif not w.ready and time.monotonic() >= w.started + START_TIMEOUT_S:  # never got ready
                    again(w)  # killed and replaced there
        return out

    def _replace(self, w):
        w.kill()
        self.workers[self.workers.index(w)] = _Worker()

    def close(self):
        for w in self.workers:
            w.kill()
        self.workers = []


def _start_error() -> str:
    """Why a worker cannot start: what the worker's imports print when run in the foreground (bounded)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        res = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {here!r}); import reward; "
                              "reward._configs()"], capture_output=True, text=True, timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"importing math-verify took over {START_TIMEOUT_S:.0f} s"
    return (res.stderr.strip().splitlines() or [f"exit code {res.returncode}, no message"])[-1]


_POOL: ScorePool | None = None


def score_batch(responses, golds, workers: int = 0, timeout: float = 10.0, should_stop=None) -> Scores:
    """Score many responses in parallel; never raises on model output.

    workers = 0 uses one per CPU core (at most 32); the pool is kept between calls. Each item is bounded
    by `timeout` seconds of wall time; one that runs over scores 0 and counts in `.timeouts`. Items that could
    not be scored at all (their worker lost again and again) are listed in `.unscored`. `should_stop`: a
    callable asked at least once a second while workers start or score; True raises Interrupted."""
    global _POOL
    if len(responses) != len(golds):
        raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
    out = Scores(fast_score(str(r), str(g)) for r, g in zip(responses, golds))
    slow = [i for i, s in enumerate(out) if s is None]  # the rest go to math-verify in the workers
    if slow:
        workers = workers or min(32, os.cpu_count() or 1)
        if _POOL is None or len(_POOL.workers) != workers:
            if _POOL is not None:
                _POOL.close()
            _POOL = ScorePool(workers)
        try:
            scored = _POOL.map([responses[i] for i in slow], [golds[i] for i in slow], timeout, should_stop)
        except RuntimeError:  # the pool could not start: the next call starts a new one
            _POOL = None
            raise
        for i, s in zip(slow, scored):
            out[i] = s
        out.timeouts, out.unscored = scored.timeouts, sorted(slow[i] for i in scored.unscored)
    return out

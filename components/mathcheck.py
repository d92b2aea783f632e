"""Answer extraction and equivalence checking shared by curation, evaluation and GRPO rewards.

`extract_boxed` is plain string work. `parse_answer`, `verify` and `answers_equivalent` wrap
math-verify (sympy underneath), whose own timeout relies on `signal.alarm` and therefore fails off
the main thread. We always call math-verify with its timeouts disabled and bound time ourselves:

* on the main thread of a process (a CLI run, a multiprocessing worker, a Ray task) with an
  interval timer that raises inside the call and then re-arms whatever timer was pending before;
* on any other thread (a thread pool, a threaded Ray actor, an async server) in a small pool of
  persistent worker processes: a call that overruns has its worker killed and replaced.

Every function returns None/False on a timeout or an error and never raises.

Simplifications: a timed-out worker costs a restart (~2 s of imports); the worker pool is capped
at `MAX_WORKERS` processes, further threads wait for a free one. On the main thread the timer's
exception waits for the running bytecode: one long computation inside C (sympy on big integers)
runs to its end first (`(x+1)^{3000}` against `(x+2)^{3000}` with a 0.5 s limit took 24 s once,
on a loaded CI machine); only the worker processes, killed from outside, have a hard bound.

Over 400 lines because the answer rules (normalisation, what counts as a final value, where a thinking
completion's answer is) and the time bound they run under are one contract that curation, rewards and evaluation
all rely on; split, the rules would drift apart.
"""
from __future__ import annotations

import atexit
import logging
import os
import pickle
import re
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any

DEFAULT_TIMEOUT_S = 5.0
MAX_WORKERS = max(2, min(8, os.cpu_count() or 2))
_WORKER_START_TIMEOUT_S = 120.0

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")
# Answers that are plain numbers parse by construction; skipping sympy for them keeps curation fast.
_PLAIN_NUMBER_RE = re.compile(r"^[+-]?(?:\d+(?:\.\d+)?|\.\d+)(?:/\d+)?$|^[+-]?\\[dt]?frac\{\d+\}\{\d+\}$")
_WORDY_RE = re.compile(r"[A-Za-z]{4,}")
# LaTeX spacing: thin, negative, medium and thick spaces, a control space "\ ", a tie ~ (a row break "\\" is kept).
_LATEX_SPACE_RE = re.compile(r"(?<!\\)(?:\\[,!;: ]|~)")


def extract_boxed(text: str | None) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) in `text`, nested braces handled; None if absent."""
    if not isinstance(text, str):
        return None
    matches = list(_BOX_RE.finditer(text))
    for m in reversed(matches):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                c = text[j]
                if c == "\\" and j + 1 < len(text):
                    j += 2  # an escaped brace \{ does not open a group
                    continue
                if c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
                j += 1
            continue  # unbalanced: try an earlier box
        # "\boxed 5" form: the argument runs to the next space or dollar sign.
        tail = re.match(r"\s*([^\s$]+)", text[m.end() :])
        if tail:
            return tail.group(1).strip()
    return None


def answer_region(completion: str, answer_in_think: bool = False) -> str | None:
    """The part of a completion where its \\boxed{} answer counts. A thinking completion (one with a <think> or
    </think> tag) answers after its last </think>, up to a <think> reopened there: a box inside the thinking is a
    draft, not the answer; one whose thinking never closes has no answer (None). A completion without tags (a
    model that does not think) answers anywhere, and so does every completion when answer_in_think is True."""
    if answer_in_think or (THINK_OPEN not in completion and THINK_CLOSE not in completion):
        return completion
    if THINK_CLOSE not in completion:
        return None
    return completion.rsplit(THINK_CLOSE, 1)[1].split(THINK_OPEN, 1)[0]


def normalize_answer_text(s: str) -> str:
    """Cheap canonical form for exact comparison: no $ or \\$ (a currency sign is never mathematics), no spacing
    (\\, \\! \\; \\: "\\ " ~), no \\left/\\right, {,} read as a comma, no trailing period, \\dfrac as \\frac."""
    # \$ first: stripping a bare $ from "18\$" would leave a dangling backslash.
    s = s.replace("\\$", "").strip().strip("$").strip()
    s = s.replace("\\left", "").replace("\\right", "").replace("{,}", ",")
    s = _LATEX_SPACE_RE.sub(" ", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".")


# ----------------------------------------------------------------------------- in-process calls


class _Timeout(BaseException):
    """BaseException so that math-verify's broad `except Exception` handlers cannot swallow it."""


def _raise_timeout(signum, frame):
    raise _Timeout()


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")


class _Limit:
    fired = False


@contextmanager
def _time_limit(timeout_s: float | None):
    """Raise _Timeout in this (main) thread after timeout_s; restores any timer set by someone else. The yielded
    limit's `fired` says whether the timer went off, even when code under it swallowed the exception (a bare
    `except:` in sympy or math-verify turns a cut-off call into an ordinary-looking False)."""
    limit = _Limit()
    if not timeout_s or timeout_s <= 0:
        yield limit
        return

    def on_alarm(signum, frame):
        limit.fired = True
        _raise_timeout(signum, frame)

    old_handler = signal.getsignal(signal.SIGALRM)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, 0)
    start = time.monotonic()
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        yield limit
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler if old_handler is not None else signal.SIG_DFL)
        if old_delay > 0:
            # Someone else's timer (pytest-timeout, an outer deadline) keeps running from where it was.
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - start), 1e-3), old_interval)


_MV = None


def _math_verify():
    global _MV
    if _MV is None:
        import math_verify
        import math_verify.grader
        import math_verify.parser

        # We pass timeout=None on purpose (time is bounded here); silence the one-off warning about it.
        math_verify.parser.TIMEOUT_WARNING_SHOWN = True
        math_verify.grader.TIMEOUT_WARNING_SHOWN = True
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        _MV = math_verify
    return _MV


def _looks_like_bare_answer(text: str) -> bool:
    # A short answer string ("1/2", "x^2+1", "(x-5)(x+3)") rather than prose around an answer.
    return len(text) <= 200 and "\n" not in text and not _WORDY_RE.search(re.sub(r"\\[A-Za-z]+", "", text))


def _uncurrency(answer: str) -> str:
    # math-verify reads a \$ inside \text{} and a tie ~ as symbols ("\text{\$}18" gives *18, "18~\text{dollars}"
    # gives "18~"): a currency sign and a space are neither.
    return re.sub(r"(?<!\\)~", " ", answer.replace("\\$", ""))


def _parse_local(text: str) -> list:
    mv = _math_verify()
    boxed = extract_boxed(text)
    if boxed is not None:
        return mv.parse("\\boxed{" + _uncurrency(boxed) + "}", parsing_timeout=None)
    stripped = _uncurrency(text.strip())
    if _looks_like_bare_answer(stripped):
        inner = stripped.strip("$").strip()
        out = mv.parse("$" + inner + "$", parsing_timeout=None)
        if out:
            return out
    return mv.parse(text, parsing_timeout=None)


def _as_parsed(x) -> list:
    return x if isinstance(x, list) else _parse_local(x)


def _verify_local(gold, pred) -> bool:
    g, p = _as_parsed(gold), _as_parsed(pred)
    if not g or not p:
        return False
    return bool(_math_verify().verify(g, p, timeout_seconds=None))


def _equiv_local(a: str, b: str) -> bool:
    return _verify_local(a, b) or _verify_local(b, a)


_OPS = {"parse": _parse_local, "verify": _verify_local, "equiv": _equiv_local}


def _run_local(op: str, args: tuple, timeout_s: float | None):
    try:
        with _time_limit(timeout_s) as limit:
            out = _OPS[op](*args)
        return None if limit.fired else out
    except _Timeout:
        return None
    except Exception:
        return None


# ----------------------------------------------------------------------------- worker processes


def _serve_stdio() -> None:  # pragma: no cover - runs in the worker process
    """Worker loop: length-prefixed pickles on a private copy of stdout, so stray prints cannot corrupt it."""
    out_fd = os.dup(1)
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    out = os.fdopen(out_fd, "wb", buffering=0)
    _math_verify()
    out.write(struct.pack("<I", 0))  # ready
    while True:
        head = inp.read(4)
        if len(head) < 4:
            return
        (n,) = struct.unpack("<I", head)
        op, args, timeout_s = pickle.loads(inp.read(n))
        result = _run_local(op, args, timeout_s)
        try:
            payload = pickle.dumps(result)
        except Exception:
            payload = pickle.dumps(None)
        out.write(struct.pack("<I", len(payload)) + payload)


class _Worker:
    def __init__(self):
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from components.mathcheck import _serve_stdio; _serve_stdio()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        if self._read(4, _WORKER_START_TIMEOUT_S) is None:
            self.close()
            raise RuntimeError("math-verify worker did not start")

    def _read(self, n: int, timeout_s: float) -> bytes | None:
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        buf = b""
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    def call(self, op: str, args: tuple, timeout_s: float):
        payload = pickle.dumps((op, args, timeout_s))
        self.proc.stdin.write(struct.pack("<I", len(payload)) + payload)
        self.proc.stdin.flush()
        # The worker enforces timeout_s itself; the margin covers a hang that no signal can interrupt.
        head = self._read(4, timeout_s + 2.0)
        if head is None:
            raise TimeoutError
        body = self._read(struct.unpack("<I", head)[0], timeout_s + 2.0)
        if body is None:
            raise TimeoutError
        return pickle.loads(body)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class _WorkerPool:
    def __init__(self, size: int):
        self.size = size
        self.idle: list[_Worker] = []
        self.count = 0
        self.cond = threading.Condition()

    def _acquire(self) -> _Worker:
        with self.cond:
            while not self.idle and self.count >= self.size:
                self.cond.wait()
            if self.idle:
                return self.idle.pop()
            self.count += 1
        try:
            return _Worker()
        except BaseException:
            with self.cond:
                self.count -= 1
                self.cond.notify()
            raise

    def _release(self, w: _Worker | None) -> None:
        with self.cond:
            if w is None:
                self.count -= 1
            else:
                self.idle.append(w)
            self.cond.notify()

    def call(self, op: str, args: tuple, timeout_s: float):
        w = self._acquire()
        try:
            result = w.call(op, args, timeout_s)
        except BaseException:
            w.close()
            self._release(None)
            return None
        self._release(w)
        return result

    def shutdown(self) -> None:
        with self.cond:
            for w in self.idle:
                w.close()
            self.idle.clear()


_POOL = _WorkerPool(MAX_WORKERS)
atexit.register(_POOL.shutdown)


def _call(op: str, args: tuple, timeout_s: float | None) -> Any:
    timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    if _on_main_thread():
        return _run_local(op, args, timeout_s)
    return _POOL.call(op, args, timeout_s)


# ----------------------------------------------------------------------------- public API


def parse_answer(text: str, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> list | None:
    """math-verify's parse of an answer or a solution: the last \\boxed{} if any, else a bare answer
    ("1/2", "x=3") as math, else math-verify's own extraction ("final answer is ..."). None if nothing
    parses, on a timeout or on any error."""
    if not isinstance(text, str) or not text.strip():
        return None
    out = _call("parse", (text,), timeout_s)
    return out or None


def verify(gold: str | list, pred: str | list, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """True when `pred` (an answer or a whole solution; its last \\boxed{} counts) is mathematically
    equivalent to the reference `gold` (1/2 == 0.5 == \\frac{1}{2}). False on timeout or error."""
    for x in (gold, pred):
        if not isinstance(x, (str, list)) or (isinstance(x, str) and not x.strip()):
            return False
    if isinstance(gold, str) and isinstance(pred, str):
        p = extract_boxed(pred)
        if normalize_answer_text(gold) == normalize_answer_text(p if p is not None else pred):
            return True
    return bool(_call("verify", (gold, pred), timeout_s))


def answers_equivalent(a: str, b: str, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """Symmetric equivalence of two answer strings; False on timeout or error."""
    if not isinstance(a, str) or not isinstance(b, str) or not a.strip() or not b.strip():
        return False
    if normalize_answer_text(a) == normalize_answer_text(b):
        return True
    return bool(_call("equiv", (a, b), timeout_s))


def preload() -> None:
    """Import math-verify (and sympy) now, e.g. before forking worker processes that will all use it."""
    _math_verify()


def is_plain_number(text: str) -> bool:
    """An integer, decimal or simple fraction: parses by construction, no sympy needed."""
    return bool(_PLAIN_NUMBER_RE.match(normalize_answer_text(text)))


_INTEGER_RE = re.compile(r"^[+-]?\d+(?:\.0*)?$")
_DECIMAL_RE = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")
# Marks a numeric answer may carry without being an expression: degrees, percent, thousands separators, units
# in \text{} (currency signs and spacing are gone with normalize_answer_text).
_NAMED_RE = re.compile(r"^[A-Za-z]=")  # x=5: the value, named
_DECORATION_RE = re.compile(r"\^\{?\\circ\}?|°|\\?%|(?<=\d),(?=\d{3}\b)")
_TEXT_RE = re.compile(r"\\(?:text|textrm|textnormal|textbf|mathrm|mathbf|mbox)\{([^{}]*)\}")
_MIXED_RE = re.compile(r"^([+-]?)(\d+)\\frac\{(\d+)\}\{(\d+)\}$")  # 3\frac{1}{2} = 7/2


def _text_arg(m: re.Match) -> str:
    # \text{18} is the number itself; \text{dollars} or \mathrm{cm} is a unit word and goes.
    inner = m.group(1)
    return inner if re.search(r"\d", inner) else ""


def _bare_value(pred: str) -> str:
    """The number a numeric answer states, its decorations removed; still an expression if it was one."""
    value = _DECORATION_RE.sub("", _TEXT_RE.sub(_text_arg, _NAMED_RE.sub("", normalize_answer_text(pred))))
    mixed = _MIXED_RE.match(value)
    if mixed and 0 < int(mixed.group(3)) < int(mixed.group(4)):  # a proper fraction: whole part plus fraction
        sign, whole, num, den = mixed.group(1), *map(int, mixed.group(2, 3, 4))
        value = f"{sign}{whole * den + num}/{den}"
    return value


def is_final_value(answer: str, pred: str) -> bool:
    """False when the reference is a number but the prediction is still an expression. math-verify evaluates
    `34+44` to 78, so a policy can earn the reward by boxing the question itself (GRPO on mathgenerator sums learned
    exactly that, 2026-11-23); a grader wants the value. For an integer reference the value must be an integer or
    decimal (156/2 is a division left undone); for a fractional one any plain number (3/4, 0.75). Non-numeric
    references (expressions, sets, intervals) are not judged here."""
    if not is_plain_number(answer):
        return True
    value = _bare_value(pred)
    if _INTEGER_RE.match(normalize_answer_text(answer)):  # 156/2 for 78 is the division left undone
        return bool(_DECIMAL_RE.match(value))
    return is_plain_number(value)


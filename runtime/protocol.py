"""The runner protocol: every message between the daemon and a runner process, in one place.

Both sides import these classes, so a message the daemon sends is the message the runner
reads: the two sides cannot disagree on a message's name or fields.
Tensors never travel here: they sit in the daemon's shared-memory segments, and a message
names the segment and the layout of the arrays in it.

Every message carries ``seq``, the id of the request it belongs to (``NO_SEQ`` for what is no
request's: load phases, ready, stop). A request is answered by zero or more non-terminal
messages (:class:`Need` for a batch whose outputs outgrew their buffer) and exactly one
terminal message (:class:`Done` or :class:`Failed`):

daemon -> runner
    :class:`Run` (one batch), :class:`OutBuffer` (answer to :class:`Need`),
    :class:`MemoryQuery`, :class:`Shrink`, :class:`Stop`; for generation runners
    :class:`Generate`, :class:`Cancel`, :class:`Slots` (below)
runner -> daemon
    :class:`Phase`, :class:`Ready`, :class:`LoadFailed` (start-up), :class:`Need`,
    :class:`Done`, :class:`Failed`; for generation runners :class:`Accepted`,
    :class:`Refused`, :class:`Tokens`, :class:`EngineStats`

The messages are slotted dataclasses, frozen except those built for every batch or engine
step (:class:`Run`, :class:`Done`, :class:`Tokens`): treat those as values too.

Wire format: a pickled pair ``(tag, fields)``, built and read by :func:`encode` and
:func:`decode`. Why not pickle the objects themselves: pickling a frozen slotted dataclass
costs ~8 µs each way against ~1 µs for a tuple (measured here), and two messages cross per
batch on the hot path. The pipe is private between the daemon and its own children, so
pickle is safe here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from operator import attrgetter
from pickle import HIGHEST_PROTOCOL, dumps, loads
from typing import Any, Callable, ClassVar, Optional, Union

from lastmile.runtime.shm import Layout

#: ``seq`` of messages that belong to no request (start-up, stop).
NO_SEQ = 0

#: Segments the pool unlinked since the last message: the runner drops its mappings of them
#: (``None``: drop all).
Unmapped = Optional[tuple]

_TYPES: dict[int, type] = {}


def _message(tag: int, *, frozen: bool = True) -> Callable[[type], type]:
    """Make ``cls`` a slotted dataclass with wire tag ``tag``, frozen unless it is built on
    the hot path (a frozen dataclass's ``__init__`` costs ~4x a plain slotted one's: measured
    ~1.4 µs against ~0.35 µs for :class:`Run`, paid on both sides of every batch)."""

    def wrap(cls: type) -> type:
        cls = dataclass(frozen=frozen, slots=True)(cls)
        names = [f.name for f in fields(cls)]
        assert names[0] == "seq", f"{cls.__name__}: seq must be the first field"
        assert tag not in _TYPES, f"wire tag {tag} used twice"
        get = attrgetter(*names)
        if len(names) == 1:
            cls._wire = lambda self, _t=tag, _g=get: (_t, (_g(self),))  # type: ignore[attr-defined]
        else:
            cls._wire = lambda self, _t=tag, _g=get: (_t, _g(self))  # type: ignore[attr-defined]
        cls.TAG = tag  # type: ignore[attr-defined]
        _TYPES[tag] = cls
        return cls

    return wrap


class _Wire:
    """What every message has (for type checkers; the decorator fills it in)."""

    __slots__ = ()
    TAG: ClassVar[int]
    seq: int

    def _wire(self) -> tuple: ...


# --- daemon -> runner --------------------------------------------------------------------------


@_message(1, frozen=False)
class Run(_Wire):
    """Run one batch: inputs are in segment ``in_segment`` at ``in_layout``; outputs go to
    ``out_segment`` (``out_capacity`` bytes) or, when they do not fit, the runner asks for a
    bigger buffer with :class:`Need`. Answered by :class:`Done` (payload: the output layout)
    or :class:`Failed`."""

    seq: int
    in_segment: str
    in_layout: Layout
    out_segment: str
    out_capacity: int
    unmapped: Unmapped


@_message(2)
class OutBuffer(_Wire):
    """Answer to :class:`Need`: a bigger output segment, or ``segment=None`` and why not."""

    seq: int
    segment: Optional[str]
    capacity: int
    error: str = ""


@_message(3)
class MemoryQuery(_Wire):
    """Ask for ``backend.memory()``; answered by :class:`Done` with that dict."""

    seq: int


@_message(4)
class Shrink(_Wire):
    """Give cached memory back (backend shrink, drop ``unmapped`` mappings, trim the heap)."""

    seq: int
    unmapped: Unmapped


@_message(7)
class Cancel(_Wire):
    """Stop generating sequence ``seq`` (its slot and KV cache are freed at once)."""

    seq: int


@_message(8)
class Stop(_Wire):
    """Finish what is in hand and exit."""

    seq: int = NO_SEQ


# --- runner -> daemon --------------------------------------------------------------------------


@_message(20)
class Phase(_Wire):
    """Start-up progress: ``loading``, ``warming`` (with timings in ``data``)."""

    seq: int
    name: str
    data: dict


@_message(21)
class Ready(_Wire):
    """The model is loaded and warmed; ``info`` is ``backend.info()`` plus timings."""

    seq: int
    info: dict


@_message(22)
class LoadFailed(_Wire):
    """Loading or warming failed; ``error`` is the operator's text; the runner exits."""

    seq: int
    error: str


@_message(23)
class Need(_Wire):
    """The outputs of batch ``seq`` need ``nbytes``, more than the buffer lent with it."""

    seq: int
    nbytes: int


@_message(25, frozen=False)
class Done(_Wire):
    """Terminal: request ``seq`` succeeded. ``backend_s``: the time the backend computed."""

    seq: int
    payload: Any
    backend_s: float = 0.0


@_message(26)
class Failed(_Wire):
    """Terminal: request ``seq`` failed; ``error`` is the operator's text (no traceback)."""

    seq: int
    error: str


# --- generation: one runner's engine loop serves many sequences at once ------------------------
# A sequence is a request (``seq``) like any other: :class:`Generate` opens it, :class:`Cancel`
# ends it early; the runner answers :class:`Accepted` (or the terminal :class:`Refused`) and
# then sends every engine iteration's chunks of all running sequences in ONE :class:`Tokens`
# message (the last chunk of a sequence carries its finish reason, which ends it). Why not a
# message per sequence and token: continuous batching advances every sequence in the same step,
# so one message per step costs one pipe write instead of one per running sequence.


@_message(40)
class Generate(_Wire):
    """daemon -> runner: start generating for ``request`` (a ``GenerationRequest``)."""

    seq: int
    request: Any


@_message(41)
class Accepted(_Wire):
    """runner -> daemon: sequence ``seq`` is admitted (queued or running); its prompt's tokens."""

    seq: int
    prompt_tokens: int


@_message(42)
class Refused(_Wire):
    """runner -> daemon, terminal: ``seq`` was refused before its first token, or ended by an
    error of its own while running (kind ``error``; the other sequences go on). ``kind`` and
    ``args`` rebuild the exception on the daemon's side (not every exception pickles)."""

    seq: int
    kind: str
    args: tuple


@_message(43, frozen=False)
class Tokens(_Wire):
    """runner -> daemon: one engine iteration's ``(seq, GenerationChunk)`` pairs (``seq`` of
    the message itself is ``NO_SEQ``)."""

    seq: int
    chunks: list


@_message(44)
class EngineStats(_Wire):
    """runner -> daemon: the engine's gauges and counters (slots, KV, tokens, latencies)."""

    seq: int
    data: dict


@_message(45)
class Slots(_Wire):
    """daemon -> runner: run at most ``limit`` sequences at once (the memory ladder's fewer
    slots); the newest beyond it are preempted and later recomputed. No answer: the next
    :class:`EngineStats` shows ``slot_limit``."""

    seq: int
    limit: int


ToRunner = Union[Run, OutBuffer, MemoryQuery, Shrink, Cancel, Stop, Generate, Slots]
ToDaemon = Union[Phase, Ready, LoadFailed, Need, Done, Failed, Accepted, Refused, Tokens, EngineStats]
Message = Union[ToRunner, ToDaemon]


def encode(msg: Message) -> bytes:
    """The bytes of ``msg`` on the pipe (``Connection.send_bytes``)."""
    return dumps(msg._wire(), HIGHEST_PROTOCOL)


def decode(data: bytes) -> Message:
    """The message ``data`` holds (from ``Connection.recv_bytes``). A tag this version does
    not know raises :class:`ValueError`."""
    tag, values = loads(data)
    try:
        cls = _TYPES[tag]
    except KeyError:
        raise ValueError(f"unknown runner message tag {tag!r}") from None
    return cls(*values)

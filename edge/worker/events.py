"""Who owns a worker, and the fan-out of its results and failures to the owner's Subscribe
stream.

A worker belongs to the coordinator that configured it (by ``coordinator_id``) while
that coordinator is alive: it holds a Subscribe stream here, or it configured the worker
less than :data:`OWNER_GRACE_S` ago and has not subscribed since (a deploy configures
every stage before it subscribes) nor let go (:meth:`EventBus.release`: it stopped, or gave
up that deployment). Another coordinator's Configure is then refused unless
it says ``take_over``; a restarted coordinator (its old process is gone, and so is its
stream) is accepted. An empty id (a tool, a test) owns nothing: anyone may replace it.

Only the owner's streams get events, and the owner's stream is always accepted (a new one
replaces its older ones), so that streams opened by anyone else, which are limited, cannot
lock the coordinator out. Events produced while the owner has no stream are kept
(bounded), so a coordinator that reconnects still gets them.

A direct client (``SubscribeRequest.client_id``) gets the results of the requests it sent
with that ``reply_to`` (:meth:`EventBus.deliver`), nothing else, after an empty event
that tells it the stream is open; its streams count among the limited ones. A result
whose client has no stream is dropped: the client sends the request again. The owner
hears how many were delivered (``Event.delivered``, at most every :data:`PROGRESS_S`),
its sign that the pipeline answers.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from edge.proto import edge_pb2 as pb
from edge.worker.errors import OwnedElsewhere, Replaced, TakenOver, TooManySubscribers

__all__ = ["EventBus", "Stream", "END", "WAKE", "OWNER_GRACE_S", "PROGRESS_S"]

log = logging.getLogger(__name__)

# How long a coordinator that configured this worker and has not subscribed yet still owns
# it: a deploy configures every stage (loading each shard) before it subscribes.
OWNER_GRACE_S = 30.0
# Direct clients' results delivered are reported to the owner at most this often.
PROGRESS_S = 0.25

END = object()  # put in a stream's queue to end it with the stream's ``ended`` error
WAKE = object()  # put in a queue to make its reader look up (a call ended, a stop)


@dataclass(eq=False)
class Stream:
    """One Subscribe call's events; ``ended``: the error it ends with once it gets END."""

    coordinator_id: str
    queue: queue.Queue = field(default_factory=queue.Queue)
    ended: Exception | None = None
    client_id: str = ""  # a direct client's stream: its results only

    def end(self, error: Exception) -> None:
        self.ended = error
        self.queue.put(END)

    def wake(self) -> None:
        """Make the reader look up from its wait (its call ended, the worker stops)."""
        self.queue.put(WAKE)


class EventBus:
    """The owner of a worker and its event streams; see the module docstring."""

    def __init__(self, backlog: int = 4096):
        self._lock = threading.Lock()
        self._streams: list[Stream] = []
        self._backlog: collections.deque = collections.deque(maxlen=backlog)
        self.owner: str | None = None      # None: never configured
        self._configured_at = 0.0          # monotonic time of the owner's last Configure
        # The owner held a stream, or let go, since that Configure: from then on it owns
        # the worker only while it holds a stream (no grace of OWNER_GRACE_S).
        self._grace_over = False
        # Coordinators that were taken over, and by whom: their Subscribe is refused with
        # ABORTED so that they learn it even if their stream was down at the time.
        self._former: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.delivered = 0            # direct clients' results handed to their streams
        self.undelivered = 0          # ... dropped: their client had no stream
        self._reported_at = 0.0       # monotonic time ``delivered`` was last published

    def _is_owner(self, coordinator_id: str) -> bool:
        return self.owner is not None and coordinator_id == self.owner

    def _owner_streams(self) -> list[Stream]:
        return [s for s in self._streams
                if not s.client_id and self._is_owner(s.coordinator_id)]

    def publish(self, event: pb.Event) -> None:
        with self._lock:
            targets = self._owner_streams()
            if not targets:
                self._backlog.append(event)
            for s in targets:
                s.queue.put(event)

    def answer(self, event: pb.Event, reply_to: str) -> None:
        """A result: to the direct client ``reply_to`` names, or (none) to the owner."""
        if reply_to:
            self.deliver(reply_to, event)
        else:
            self.publish(event)

    def deliver(self, client_id: str, event: pb.Event) -> bool:
        """Hand a direct client's result to its newest stream; False if it has none (the
        result is dropped: the client sends the request again)."""
        with self._lock:
            stream = next((s for s in reversed(self._streams) if s.client_id == client_id),
                          None)
            if stream is None:
                self.undelivered += 1
                return False
            stream.queue.put(event)
            self.delivered += 1
            now = time.monotonic()
            if now - self._reported_at >= PROGRESS_S:
                self._reported_at = now
                for s in self._owner_streams():
                    s.queue.put(pb.Event(delivered=self.delivered))
            return True

    def subscribe(self, coordinator_id: str, limit: int, client_id: str = "") -> Stream:
        """A stream of events from now on (and the backlog, for the owner's first stream);
        with ``client_id``, a direct client's stream of its results (a newer one of the same
        client replaces it).

        Raises:
            TakenOver: for a coordinator that was taken over.
            TooManySubscribers: when ``limit`` streams of others than the owner are open.
        """
        with self._lock:
            if coordinator_id and coordinator_id in self._former:
                raise TakenOver(self._former[coordinator_id])
            stream = Stream("" if client_id else coordinator_id, client_id=client_id)
            if client_id:
                for old in [s for s in self._streams if s.client_id == client_id]:
                    old.end(Replaced("replaced by a newer stream of the same client"))
                    self._streams.remove(old)
                stream.queue.put(pb.Event())  # tells the client its stream is open
            if not client_id and coordinator_id and self._is_owner(coordinator_id):
                # Its older stream is one it gave up on (a reconnect after a network blip).
                for old in [s for s in self._streams if s.coordinator_id == coordinator_id]:
                    old.end(Replaced("replaced by a newer stream of the same coordinator"))
                    self._streams.remove(old)
                self._grace_over = True
            else:
                others = [s for s in self._streams
                          if s.client_id or not (s.coordinator_id
                                                 and self._is_owner(s.coordinator_id))]
                if len(others) >= limit:
                    raise TooManySubscribers(
                        f"{limit} subscribers are listening already; expected one per "
                        "coordinator or direct client: close a stale one and retry")
            if not client_id and self._is_owner(coordinator_id):
                while self._backlog:
                    stream.queue.put(self._backlog.popleft())
            self._streams.append(stream)
        return stream

    def unsubscribe(self, stream: Stream) -> None:
        with self._lock:
            if stream in self._streams:
                self._streams.remove(stream)

    def release(self, coordinator_id: str) -> bool:
        """The owner lets go: it will not subscribe, so its claim ends now instead of
        :data:`OWNER_GRACE_S` after its Configure (as if its stream had come and gone).
        Returns whether ``coordinator_id`` was the owner; from anyone else it does nothing."""
        with self._lock:
            if not coordinator_id or not self._is_owner(coordinator_id):
                return False
            self._grace_over = True
            return True

    def wake_all(self) -> None:
        """Wake every stream's reader (the worker stops)."""
        with self._lock:
            for s in self._streams:
                s.wake()

    def refusal(self, coordinator_id: str, take_over: bool, serving: str) -> str | None:
        """Why ``coordinator_id`` may not configure this worker now, or None if it may.

        Args:
            serving: what the worker serves now, for the message ("plan P, epoch E").
        """
        with self._lock:
            owner = self.owner
            if not owner or owner == coordinator_id or take_over:
                return None
            if any(s.coordinator_id == owner for s in self._streams):
                alive = "it holds this worker's event stream"
            else:
                ago = time.monotonic() - self._configured_at
                if self._grace_over or ago >= OWNER_GRACE_S:
                    return None  # gone (a restarted coordinator is the common case)
                alive = (f"it configured this worker {ago:.1f} s ago and has not subscribed "
                         f"yet (its claim lapses in {OWNER_GRACE_S - ago:.0f} s)")
        said = coordinator_id or "a coordinator that gave no id"
        return (f"this worker belongs to coordinator {owner} ({serving}), which is alive: "
                f"{alive}; expected a Configure from it, got one from {said}. Two "
                "coordinators on one cluster would take each other's workers: stop the other "
                "coordinator, or start this one with `edge coordinator --take-over` to replace "
                "it")

    def check_may_configure(self, coordinator_id: str, take_over: bool, serving: str) -> None:
        """Raise OwnedElsewhere with :meth:`refusal`'s reason, if there is one."""
        refusal = self.refusal(coordinator_id, take_over, serving)
        if refusal:
            raise OwnedElsewhere(refusal)

    def claim(self, coordinator_id: str, serving: str) -> None:
        """Make ``coordinator_id`` the owner; a previous owner's streams end with TakenOver."""
        with self._lock:
            previous = self.owner
            if previous != coordinator_id:
                self._backlog.clear()  # the previous owner's results are not the new one's
                if previous:
                    why = (f"this worker was taken over by coordinator "
                           f"{coordinator_id or '(no id)'} ({serving}); coordinator {previous} "
                           "no longer owns it")
                    self._former[previous] = why
                    while len(self._former) > 16:
                        self._former.popitem(last=False)
                    for s in [s for s in self._streams if s.coordinator_id == previous]:
                        s.end(TakenOver(why))
                        self._streams.remove(s)
                    log.warning("%s", why)
            self._former.pop(coordinator_id, None)
            self.owner = coordinator_id
            self._configured_at = time.monotonic()
            stream = next((s for s in self._streams if coordinator_id
                           and s.coordinator_id == coordinator_id), None)
            self._grace_over = stream is not None
            if stream is not None:
                while self._backlog:
                    stream.queue.put(self._backlog.popleft())

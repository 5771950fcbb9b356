"""The token loop of ``edge generate``: a prompt in, tokens and text out as they come.

A sequence is a uuid whose KV caches live on the stages. Its first step (prefill) sends
the whole prompt at position 0; each later step (decode) sends the one token drawn last,
at position = tokens already cached. Every step goes through the pipeline's in-flight
table like an Infer (admission, retries, resends after a failover), and its result
carries the token the last stage drew. The loop stops at an end-of-sequence token (not
emitted), at ``max_tokens`` or the plan's context ("length"), or when the text ends with a
stop string (not emitted either); then it frees the caches with a release step (best
effort: stages also free caches left idle too long).

Failover: a step sent again (its stage gone, a new epoch, a stage whose caches do not
match its position) is sent as its *replay*: a prefill at position 0 of every token so
far, prompt and generated. It restarts the caches on every stage and draws the same token
the step would have (the last stage seeds its draw with the position), and the loop
yields one token per step, so nothing already streamed comes again.

Batching: the decode steps of the sequences generating at once go through a
:class:`~edge.coordinator.batcher.Batcher`, which sends those ready together as one
request that every stage runs as one batch (``max_batch`` rows at most; 1: every step
alone). Prefills and replays are sent alone; a batch that is refused or overtaken by a
failover is answered FAILED_PRECONDITION, and each of its rows then sends its replay
alone, as a single step's refusal does.

At most ``generation.sequences`` sequences hold caches at once (the stages were planned
for that many); more wait in a bounded queue, and past the queue a request is refused
with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import grpc
import numpy as np

from edge.coordinator import guard, metrics
from edge.coordinator.batcher import Batcher
from edge.coordinator.inflight import InferError
from edge.planning.generation import batch_rows_that_fit
from edge.planning.plan import Plan
from edge.proto import edge_pb2 as pb
from edge.transport.codec import encode_tensors

__all__ = ["Generator", "Generation", "Chunk", "Usage", "TextStream", "Tokenizer",
           "check_context", "step_tensors"]

log = logging.getLogger(__name__)

_INVALID = grpc.StatusCode.INVALID_ARGUMENT


class Tokenizer(Protocol):
    """What the loop needs of a tokenizer (:class:`edge.text.ChatTokenizer` is one)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def chat_ids(self, messages: Sequence[Any],
                 add_generation_prompt: bool = True) -> list[int]: ...


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float          # from the request (queueing included) to the first token
    tokens_per_s: float     # generated tokens after the first, per second
    finish_reason: str      # "stop" (EOS or a stop string) or "length"

    def to_proto(self) -> pb.Usage:
        return pb.Usage(prompt_tokens=self.prompt_tokens,
                        completion_tokens=self.completion_tokens, ttft_ms=self.ttft_ms,
                        tokens_per_s=self.tokens_per_s, finish_reason=self.finish_reason)


@dataclass
class Chunk:
    """What one message of the stream adds: the tokens drawn (all of them, a stop
    string's included) and the text they complete; ``usage`` in the last one only."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    usage: Usage | None = None

    def to_proto(self) -> pb.GenerateReply:
        out = pb.GenerateReply(tokens=self.tokens, text=self.text)
        if self.usage is not None:
            out.usage.CopyFrom(self.usage.to_proto())
        return out


class TextStream:
    """Incremental detokenization with stop strings.

    A token's text can depend on the ones before it (a leading space a tokenizer drops at
    the start of a text, bytes of one character split over tokens), so each new token is
    decoded with a short window of the ones before it, as vLLM does: the window's text
    without the new tokens, and with them, differ by the new text. Only the window is
    decoded, so a token costs the same at position 2000 as at 2. A text ending in U+FFFD
    (a character whose bytes are not all there yet) waits for the next token. Any tail that
    could be the start of a stop string is held back; once the text contains a stop
    string, what comes before it is handed out and :attr:`stopped` is set.

    Args:
        tokenizer: decodes ids (None: no text, tokens only).
        stop: stop strings.
    """

    def __init__(self, tokenizer: Tokenizer | None, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self._prefix = 0  # ids[_prefix:_read] is the window before the undecoded tokens
        self._read = 0

    def add(self, token: int) -> str:
        """The text that ``token`` completes ("" while a character or a possible stop
        string is incomplete)."""
        self.ids.append(int(token))
        if self.tokenizer is None or self.stopped:
            return ""
        self.text = text = self.text + self._decode_new(final=False)
        longest = max((len(s) for s in self.stop), default=0)
        found = [i for i in (text.find(s, max(0, self.emitted - longest)) for s in self.stop)
                 if i >= 0]
        if found:
            self.stopped = True
            return self._emit(max(min(found), self.emitted))
        end = len(text)
        for k in range(min(longest - 1, end - self.emitted), 0, -1):
            if any(s.startswith(text[end - k:end]) for s in self.stop):
                end -= k
                break
        return self._emit(end)

    def flush(self) -> str:
        """What is held back, at the end of the sequence ("" after a stop string)."""
        if self.stopped or self.tokenizer is None:
            return ""
        self.text += self._decode_new(final=True)
        return self._emit(len(self.text))

    def _decode_new(self, final: bool) -> str:
        """The text of the tokens not decoded yet ("" while it ends in an incomplete
        character, unless ``final``)."""
        assert self.tokenizer is not None
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        after = self.tokenizer.decode(self.ids[self._prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before):]

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        out, self.emitted = self.text[self.emitted:end], end
        return out


def check_context(plan: Plan, prompt_tokens: int, max_tokens: int) -> int:
    """The tokens a request may generate: ``max_tokens`` (0: no limit) within the plan's
    context, which holds the prompt and what is generated.

    Raises:
        InferError: FAILED_PRECONDITION for a plan without generation; INVALID_ARGUMENT for
            an empty prompt or one that leaves no room in the context.
    """
    gen = plan.model.generation
    if gen is None:
        raise InferError(grpc.StatusCode.FAILED_PRECONDITION,
                         f"plan {plan.plan_id} ({plan.model.name}) is not planned for "
                         f"generation; plan a decoder with KV caches (edge plan --context)",
                         retryable=False)
    try:
        room = guard.check_context(plan, prompt_tokens, gen.context)
    except guard.BeyondContext as e:
        raise InferError(_INVALID, str(e), retryable=False) from None
    if room == 0:
        raise InferError(_INVALID, f"a prompt of {prompt_tokens} tokens leaves no room in "
                                   f"the plan's context of {gen.context} tokens (prompt and "
                                   f"generated); send at most {gen.context - 1}", False)
    return min(max_tokens, room) if max_tokens > 0 else room


def step_tensors(plan: Plan, tokens: Sequence[int], position: int) -> list[pb.Tensor]:
    """The model's inputs for a step of ``tokens`` after ``position`` cached ones: the ones
    of ``input_ids``, ``attention_mask`` and ``position_ids`` that the model has."""
    n = len(tokens)
    arrays = {"input_ids": np.asarray([tokens], dtype=np.int64),
              "attention_mask": np.ones((1, position + n), dtype=np.int64),
              "position_ids": np.arange(position, position + n, dtype=np.int64)[None, :]}
    names = {t.name for t in plan.model.inputs}
    return encode_tensors({k: v for k, v in arrays.items() if k in names})


class _Slots:
    """Sequences holding caches (at most ``size``) and those waiting (at most ``queue``)."""

    def __init__(self, size: int, queue: int):
        self.size, self.queue = size, queue
        self.busy = self.waiting = 0
        self._cond = threading.Condition()

    def acquire(self, cancelled: threading.Event, timeout: float) -> None:
        with self._cond:
            if self.busy < self.size:
                self.busy += 1
                return
            if self.waiting >= self.queue:
                raise InferError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"{self.size} sequences generating and {self.waiting} "
                                 f"waiting; retry later")
            self.waiting += 1
            try:
                end = time.monotonic() + timeout
                while self.busy >= self.size:
                    left = end - time.monotonic()
                    if cancelled.is_set() or left <= 0:
                        raise InferError(
                            grpc.StatusCode.CANCELLED if cancelled.is_set()
                            else grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"waited {timeout:.0f} s for one of {self.size} sequences")
                    self._cond.wait(min(left, 0.05))
                self.busy += 1
            finally:
                self.waiting -= 1

    def release(self) -> None:
        with self._cond:
            self.busy -= 1
            self._cond.notify()


class Generator:
    """Generates over a :class:`~edge.coordinator.pipeline.Pipeline` serving a decoder.

    Args:
        pipeline: the pipeline (its plan has ``model.generation``).
        tokenizer: the model's tokenizer (default: loaded with :func:`edge.text.
            load_tokenizer` from ``plan_dir / generation.tokenizer`` on first use; none if
            the plan names none, and then only token prompts are taken).
        queue: sequences that may wait for a free one (default: 4 times
            ``generation.sequences``); past it, RESOURCE_EXHAUSTED.
        max_batch: decode steps of different sequences run as one batch at most
            (default: ``generation.sequences``; 1: each step alone).
        batch_slots: batches in flight at once (default: the plan's stages).
    """

    def __init__(self, pipeline: Any, tokenizer: Tokenizer | None = None,
                 queue: int | None = None, max_batch: int | None = None,
                 batch_slots: int | None = None):
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch: expected at least 1, got {max_batch}")
        self.pipeline = pipeline
        self._tokenizer = tokenizer
        self._loaded = tokenizer is not None
        self._queue = queue
        self._max_batch, self._batch_slots = max_batch, batch_slots
        self._slots: _Slots | None = None
        self._batcher: Batcher | None = None
        self._lock = threading.Lock()  # two first requests at once make one _Slots
        metrics.watch_generator(self)

    @property
    def batcher(self) -> Batcher | None:
        """What batches the decode steps (None when ``max_batch`` is 1)."""
        with self._lock:
            if self._batcher is None:
                size = self._max_batch or self._default_batch()
                if size <= 1:
                    return None
                self._batcher = Batcher(self.pipeline, size, self._batch_slots)
            return self._batcher

    def _default_batch(self) -> int:
        """The plan's sequences, or fewer if a batch of them would not fit in memory."""
        plan = self.pipeline.plan
        want = plan.model.generation.sequences if plan.model.generation else 1
        size = batch_rows_that_fit(plan, want)
        if size < want:
            log.info("decode batches of at most %d rows (of %d sequences): a larger "
                     "batch's transient copies of the caches would not fit in the stages' "
                     "memory; --max-batch sets it", size, want)
        return size

    @property
    def slots(self) -> "_Slots":
        """The sequences generating and waiting (sized from the plan on first use)."""
        with self._lock:
            if self._slots is None:
                gen = self.pipeline.plan.model.generation
                sequences = gen.sequences if gen else 1
                self._slots = _Slots(sequences,
                                     4 * sequences if self._queue is None else self._queue)
            return self._slots

    def sequences(self) -> tuple[int, int]:
        """Sequences generating (holding caches) and waiting for a free one."""
        slots = self._slots
        return (slots.busy, slots.waiting) if slots is not None else (0, 0)

    @property
    def tokenizer(self) -> Tokenizer | None:
        if not self._loaded:
            gen = self.pipeline.plan.model.generation
            if gen is not None and gen.tokenizer:
                from edge.text import load_tokenizer  # tokenizers only when generating

                self._tokenizer = load_tokenizer(Path(self.pipeline.plan_dir) / gen.tokenizer)
            self._loaded = True
        return self._tokenizer

    def prompt_ids(self, prompt: str, chat: bool = False) -> list[int]:
        """The prompt's token ids: as one user message in the chat template (``chat``),
        else encoded as the tokenizer does by default."""
        tok = self.tokenizer if self.pipeline.plan.model.generation else None
        if tok is None:
            raise InferError(_INVALID, "this plan has no tokenizer: send prompt_tokens "
                                       "instead of a prompt", retryable=False)
        if chat:
            return list(tok.chat_ids([{"role": "user", "content": prompt}],
                                     add_generation_prompt=True))
        return list(tok.encode(prompt))

    def start_request(self, request: pb.GenerateRequest) -> "Generation":
        """:meth:`start` for a Generate RPC: its prompt tokens, or its prompt tokenized
        (``chat``: as one user message in the chat template).

        Raises:
            InferError: FAILED_PRECONDITION for a plan without generation, INVALID_ARGUMENT
                for a prompt that is empty, too long, or text without a tokenizer.
        """
        metrics.count_request("generate")
        try:
            check_context(self.pipeline.plan, 1, 0)  # a plan without generation, first
            ids = list(request.prompt_tokens)
            if not ids and request.prompt:
                ids = self.prompt_ids(request.prompt, request.chat)
            return self._start(ids, request.max_tokens,
                               request.sampling if request.HasField("sampling") else None,
                               list(request.stop))
        except InferError as e:
            metrics.count_error("generate", e.code)
            raise

    def start(self, prompt_tokens: Sequence[int], max_tokens: int = 0,
              sampling: pb.Sampling | None = None, stop: Sequence[str] = ()) -> "Generation":
        """Check a request and return its :class:`Generation` (iterate it to run it).

        Args:
            prompt_tokens: the prompt's token ids.
            max_tokens: tokens to generate at most (0: up to the plan's context).
            sampling: how the last stage draws (default greedy); a seed of 0 with a
                temperature gets a random seed, fixed for the sequence (replays need it).
            stop: stop strings (need a tokenizer).

        Raises:
            InferError: the request cannot be served (see :func:`check_context`).
        """
        metrics.count_request("generate")
        try:
            return self._start(prompt_tokens, max_tokens, sampling, stop)
        except InferError as e:
            metrics.count_error("generate", e.code)
            raise

    def _start(self, prompt_tokens: Sequence[int], max_tokens: int,
               sampling: pb.Sampling | None, stop: Sequence[str]) -> "Generation":
        plan = self.pipeline.plan
        limit = check_context(plan, len(prompt_tokens), max_tokens)
        own = pb.Sampling()
        if sampling is not None:
            own.CopyFrom(sampling)
        sampling = own
        if sampling.temperature > 0 and sampling.seed == 0:
            sampling.seed = random.getrandbits(63)
        if any(stop) and self.tokenizer is None:
            raise InferError(_INVALID, "stop strings need a tokenizer; this plan has none",
                             retryable=False)
        return Generation(self, [int(t) for t in prompt_tokens], limit, sampling,
                          TextStream(self.tokenizer, stop))


class Generation:
    """One request's sequence: iterate it for its :class:`Chunk`\\ s; :meth:`cancel` from
    another thread (the client went away) ends it and frees its caches."""

    def __init__(self, generator: Generator, prompt: list[int], max_tokens: int,
                 sampling: pb.Sampling, text: TextStream):
        self.generator, self.pipeline = generator, generator.pipeline
        self.prompt, self.max_tokens = prompt, max_tokens
        self.sampling, self.text = sampling, text
        self.sequence_id = uuid.uuid4().hex
        self.started = time.perf_counter()
        self.cancelled = threading.Event()
        self._request_id = ""
        self._cached = False

    def cancel(self) -> None:
        self.cancelled.set()
        if self._request_id:
            self.pipeline.cancel(self._request_id, f"sequence {self.sequence_id} cancelled")

    def __iter__(self) -> Iterator[Chunk]:
        with metrics.tracked("generate", count=False):  # counted by Generator.start
            slots = self.generator.slots
            slots.acquire(self.cancelled, self.pipeline.deadlines.infer)
            try:
                yield from self._run()
            finally:
                if self._cached:
                    self.pipeline.release(self.sequence_id)
                slots.release()

    def _run(self) -> Iterator[Chunk]:
        eos = set(self.pipeline.plan.model.generation.eos_token_ids)
        tokens, new, epoch = list(self.prompt), list(self.prompt), -1
        produced: list[int] = []
        first = last = 0.0
        reason = "length"
        metrics.count_prompt(len(self.prompt))
        while len(produced) < self.max_tokens:
            result = self._step(tokens, new, epoch)
            previous, last = last, time.perf_counter()
            first = first or last
            epoch, token = result.epoch, int(result.tokens[0])
            if not previous:
                metrics.first_token(first - self.started)
            if token in eos:
                reason = "stop"
                break
            metrics.token(last - previous if previous else None)
            produced.append(token)
            tokens.append(token)
            new = [token]
            delta = self.text.add(token)
            if self.text.stopped:
                reason = "stop"
                yield Chunk([token], delta)
                break
            yield Chunk([token], delta)
        rate = (len(produced) - 1) / (last - first) if len(produced) > 1 and last > first \
            else 0.0
        usage = Usage(len(self.prompt), len(produced),
                      (first - self.started) * 1e3 if first else 0.0, rate, reason)
        yield Chunk([], self.text.flush(), usage)

    def _step(self, tokens: list[int], new: list[int], epoch: int) -> pb.Activation:
        """Run the step that feeds ``new`` (the last tokens of ``tokens``)."""
        if self.cancelled.is_set():
            raise InferError(grpc.StatusCode.CANCELLED, f"sequence {self.sequence_id} "
                                                        f"cancelled", retryable=False)
        plan, position = self.pipeline.plan, len(tokens) - len(new)
        step = pb.Step(sequence_id=self.sequence_id, position=position, sampling=self.sampling,
                       length=len(tokens))
        so_far = list(tokens)

        def replay() -> tuple[list[pb.Tensor], pb.Step]:
            return (step_tensors(plan, so_far, 0),
                    pb.Step(sequence_id=self.sequence_id, sampling=self.sampling,
                            length=len(so_far)))

        self._cached = True  # from here on a stage may hold caches of it
        batcher = self.generator.batcher if len(new) == 1 and position > 0 else None

        def alone() -> pb.Activation:
            return self.pipeline.step(step_tensors(plan, new, position), step, replay,
                                      cache_epoch=epoch, on_admit=self._admitted)

        try:
            if batcher is not None and epoch == self.pipeline.epoch:
                result = batcher.step(step, new[0], epoch, self.cancelled, alone)
            else:
                result = alone()
        except InferError as e:
            if e.code != grpc.StatusCode.FAILED_PRECONDITION or position == 0:
                raise
            # Without failover a refusal answers the step; a stage whose caches do not
            # match it takes the replay.
            log.info("sequence %s: %s; replaying it", self.sequence_id, e)
            result = self.pipeline.step(*replay(), replay, on_admit=self._admitted)
        finally:
            self._request_id = ""
        if not result.tokens:
            raise InferError(grpc.StatusCode.INTERNAL, f"the last stage answered step "
                                                       f"{position} of sequence "
                                                       f"{self.sequence_id} without a token")
        return result

    def _admitted(self, request_id: str) -> None:
        self._request_id = request_id
        if self.cancelled.is_set():
            self.cancel()

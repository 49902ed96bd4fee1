"""The models behind the service: a thin async layer over `Embedder` / `Reranker`.

Each served model keeps its own admission count (`max_concurrent_requests`; the app takes a request's place before
its body is read, `admitted`), tokenises off the event loop with the model's own `tokenize`, runs the rows through a
`BatchScheduler` (cross-request batching) and finishes them with the task's own head, so a served result is what the
offline API returns for the same input.

Errors a client causes or meets carry their HTTP status (`ServiceError.status`); the app turns them into responses.
"""
from __future__ import annotations

import asyncio
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.api import Embedder, InputTooLongError, Reranker, check_max_length, check_set, rank_order
from toolkit.errors import ToolkitError, check_int, clipped, is_integer
from toolkit.scheduler import BatchScheduler, SchedulerStopped, check_max_batch_tokens, check_max_wait_ms
from toolkit.serve.metrics import ServiceMetrics
from toolkit.tasks import yes_log_odds
from toolkit.text import holds_prefix

# inputs up to this many characters (or token ids) are tokenised on the event loop: that takes ~50 us for a sentence,
# less than a hand-off to a worker thread, whose wake-up also preempts a compute thread (and the others wait for it)
INLINE_TOKENIZE_CHARS = 2048


class ServiceError(ToolkitError):
    """A request the service answers with `status` and this message."""

    status = 500


class ModelNotLoaded(ServiceError):
    """The route's model was not given to this server."""

    status = 404


class LimitExceeded(ServiceError):
    """The request is over one of the server's size limits."""

    status = 413


class Overloaded(ServiceError):
    """The model already has its maximum of requests in flight."""

    status = 429


class Unavailable(ServiceError):
    """The backend failed on this request, or the server is shutting down."""

    status = 503


@dataclass(frozen=True)
class Limits:
    """What one server accepts and how it batches (TEI's flags of the same names). `max_input_length` is in tokens,
    prompt included, for each model at most its set's largest SEQ (None: the largest SEQ); `payload_limit` in bytes
    per request body."""

    max_batch_tokens: int = 16384
    max_wait_ms: float = 2.0
    max_concurrent_requests: int = 512
    max_client_batch_size: int = 32
    max_input_length: int | None = None
    payload_limit: int = 2_000_000

    def __post_init__(self):
        # numpy integers kept as plain ints: /info answers these fields as JSON
        for name, value in vars(self).items():
            if is_integer(value):
                object.__setattr__(self, name, int(value))

    def check(self) -> "Limits":
        """Raise ToolkitError naming the flag of the first invalid limit; return self. (`max_batch_tokens` against
        the max input length: `model_sets`, once the sets are known.)"""
        for name, value in vars(self).items():
            flag = f"--{name.replace('_', '-')}"
            if name == "max_wait_ms":
                check_max_wait_ms(value, flag)
            elif not (name == "max_input_length" and value is None):
                check_int(value, flag, 1)
        return self


def model_sets(embedding_dir: str | Path | None, reranker_dir: str | Path | None,
               limits: Limits) -> dict[type, tuple[str | Path, int | None]]:
    """The bucket sets a server runs, by model class, each with the max input length its model opens with (None: its
    largest SEQ), checked without loading them: artifacts of the right task; `max_input_length` within the largest SEQ
    of a set, each model taking it up to its own largest SEQ (one flag serves both models, whose sets may differ); the
    batch token budget at least each model's max input length."""
    sets = {cls: (path, check_set(path, cls.task, lambda found: f"pass it as --{found}"))
            for cls, path in ((Embedder, embedding_dir), (Reranker, reranker_dir)) if path is not None}
    requested = limits.max_input_length
    if requested is not None:
        path, manifests = max(sets.values(), key=lambda found: found[1][-1].seq_len)
        each = "; each model is capped at its own" if len(sets) > 1 else ""
        check_max_length(requested, manifests[-1].seq_len, f"the largest SEQ in {path}{each}", "--max-input-length")
    capped = {}
    for cls, (path, manifests) in sets.items():
        max_length = None if requested is None else min(requested, manifests[-1].seq_len)
        check_max_batch_tokens(limits.max_batch_tokens, max_length or manifests[-1].seq_len, "--max-batch-tokens")
        capped[cls] = (path, max_length)
    return capped


def load_models(embedding_dir: str | Path | None, reranker_dir: str | Path | None, limits: Limits,
                instances: int | str = 1) -> dict[str, Embedder | Reranker]:
    """The models a server runs, by task name, loaded from bucket-set directories (either may be None)."""
    models = {}
    try:
        for cls, (path, max_length) in model_sets(embedding_dir, reranker_dir, limits).items():
            models[cls.task.name] = cls.from_artifacts(path, instances=instances, max_length=max_length)
    except BaseException:
        for model in models.values():
            model.close()
        raise
    return models


def first_line(error: Exception) -> str:
    """The first line of an error's message (clipped), for a one-line answer."""
    return clipped((str(error).strip().splitlines() or [""])[0])


def truncation(truncate: bool) -> str:
    """The API's truncation policy for a request's `truncate` flag."""
    return "truncate" if truncate else "error"


class ServedModel:
    """One model behind the service: admission, tokenisation off the event loop, the cross-request scheduler."""

    warm_up_input: list  # inputs of the model's `tokenize`, run once at startup

    def __init__(self, model: Embedder | Reranker, limits: Limits, metrics: ServiceMetrics):
        # the tokenizer's lazy setup (a ~0.1 s scan of the vocabulary) now, not on the event loop of the first request
        try:
            model.tokenize(self.warm_up_input)
        except ToolkitError:  # set up all the same; a request this set cannot hold is refused with the reason
            pass
        self.model, self.limits, self.metrics, self.name = model, limits, metrics, model.task.name
        self.scheduler = BatchScheduler(model.runner, limits.max_batch_tokens, limits.max_wait_ms,
                                        metrics.observer(self.name))
        self.active = 0  # requests admitted and not answered (touched on the event loop only)
        metrics.track(self.name, lambda: self.scheduler.pending_rows, lambda: self.active)

    @property
    def model_name(self) -> str:
        """The artifact set's name (what responses report as `model`)."""
        return self.model.manifests[0].name if self.model.manifests else self.name

    def check_client_batch(self, inputs: int) -> None:
        """Refuse a request of more inputs than the max client batch size."""
        if inputs > self.limits.max_client_batch_size:
            raise LimitExceeded(f"{inputs} inputs in one request is over the max client batch size "
                                f"{self.limits.max_client_batch_size}; split the request or raise "
                                "--max-client-batch-size")

    @contextmanager
    def admitted(self):
        """Hold one of the model's concurrent-request places for the block, or refuse the request (Overloaded). The
        app holds it from before the request's body is read to its answer: a refusal reads no body."""
        if self.active >= self.limits.max_concurrent_requests:
            raise Overloaded(f"the {self.name} model is at its max concurrent requests "
                             f"({self.limits.max_concurrent_requests}); retry shortly")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    async def rows(self, make_rows, inputs: list, *args, can_truncate: bool = True) -> list[list[int]]:
        """Token rows from `make_rows(inputs, *args)` (the tokenize stage): on the event loop for small inputs, else
        on a worker thread."""
        size = sum(sum(map(len, x)) if isinstance(x, tuple) else len(x) for x in inputs)
        try:
            with self.metrics.stage(self.name, "tokenize"):
                if size <= INLINE_TOKENIZE_CHARS:
                    return make_rows(inputs, *args)
                return await asyncio.to_thread(make_rows, inputs, *args)
        except InputTooLongError as e:
            fix = 'shorten it or send "truncate": true' if can_truncate else "shorten it"
            raise LimitExceeded(f"input #{e.index} is longer than the max input length of {e.max_length} tokens "
                                f"(prompt included); {fix}") from None

    async def run(self, rows: list[list[int]]) -> np.ndarray:
        """Raw outputs of the rows, batched with other requests'; a backend failure is this request's 503. Cancelled,
        it withdraws the rows still waiting for a batch."""
        try:
            future = self.scheduler.submit(rows)
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # the client left (the app cancels its request): its waiting rows never run
            self.scheduler.cancel(future)
            raise
        except SchedulerStopped as e:
            raise Unavailable(f"the {self.name} model takes no more requests ({first_line(e)}); the server needs a "
                              "restart (its /health is 503)") from e
        except Exception as e:
            raise Unavailable(f"the {self.name} backend failed on this request ({type(e).__name__}: "
                              f"{first_line(e)}); retry it") from e

    def healthy(self) -> bool:
        """Whether requests are being taken and run."""
        return self.scheduler.alive

    def describe(self) -> dict:
        """What `/info` says about this model (`instruction`: the one the set was compiled for; None: any)."""
        first = self.model.manifests[0] if self.model.manifests else None
        source = {"checkpoint": first.model.checkpoint, "synthetic": first.model.synthetic,
                  "dtype": first.dtype, "backend": first.backend, "device": first.target.device,
                  "instruction": first.instruction} if first else {}
        return {"task": self.name, "model": self.model_name, **source,
                "buckets": [{"seq": m.seq_len, "batch": m.batch} for m in self.model.manifests],
                "max_input_length": self.model.max_length, "instances": self.model.runner.engines[0].instances,
                "threads_per_instance": self.model.runner.engines[0].threads}

    def close(self) -> None:
        """Run what is queued, then stop the engines."""
        self.scheduler.close()
        self.model.close()


class EmbeddingService(ServedModel):
    """The embedding model: texts or token ids → vectors, as `Embedder.encode`."""

    model: Embedder
    warm_up_input = ["warm up"]

    async def embed(self, texts: list[str], instruction: str | None = None, truncate: bool | None = False,
                    dimensions: int | None = None, normalize: bool = True) -> tuple[np.ndarray, int]:
        """Vectors for texts and the tokens they took; `truncate=None`: the route has no truncate option (too long
        is an error)."""
        self._check_dimensions(dimensions)
        self.check_client_batch(len(texts))
        rows = await self.rows(self._text_rows, texts, instruction, bool(truncate), can_truncate=truncate is not None)
        vectors = self.model.task.finish(await self.run(rows), dim=dimensions, normalize=normalize)
        return vectors, sum(map(len, rows))

    async def embed_ids(self, bodies: list[list[int]], dimensions: int | None = None) -> tuple[np.ndarray, int]:
        """Vectors for inputs sent as token ids (the text's tokens, without the closing <|endoftext|>)."""
        self._check_dimensions(dimensions)
        self.check_client_batch(len(bodies))
        rows = await self.rows(self.model.tokenize_ids, bodies, can_truncate=False)
        self._check_cached_prefix(rows)
        return self.model.task.finish(await self.run(rows), dim=dimensions), sum(map(len, rows))

    async def tokens(self, texts: list[str], instruction: str | None = None, truncate: bool = False,
                     add_special_tokens: bool = True) -> list[list[tuple[int, int | None, int | None]]]:
        """The rows `/embed` would run for these texts, each token as (id, start, stop): the characters of its text it
        covers, None for a token of the prompt around the text. Without `add_special_tokens`, without the tokens the
        task frames every row with (the closing <|endoftext|>)."""
        self.check_client_batch(len(texts))
        return await self.rows(self._text_tokens, texts, instruction, truncate, add_special_tokens)

    def instruction_for(self, prompt_name: str | None, instruction: str | None) -> str | None:
        """The instruction a request's texts are formatted with: its `instruction`, or its sentence-transformers
        `prompt_name`: "query" is the one `Embedder.encode_queries` takes (the set's fixed one, else web search),
        "document" none (bare text). A set compiled for one instruction takes only that one."""
        if prompt_name is not None:
            instruction = self.model.query_instruction if prompt_name == "query" else None
        fixed = self.model.fixed_instruction
        if fixed is not None and instruction != fixed:
            raise ToolkitError(f"this set was compiled for queries with the instruction {fixed!r} (its tokens are "
                               'cached in the graph): send "prompt_name": "query" (or that "instruction"); other texts '
                               "need a set compiled without --instruction")
        return instruction

    def _check_cached_prefix(self, rows: list[list[int]]) -> None:
        """Refuse token rows that do not start with the prompt tokens the set's graph holds the keys and values of:
        the backend fails on such a row, and with it every request batched with it."""
        prefix = self.model.manifests[0].cached_prefix if self.model.manifests else []
        for i, row in enumerate(rows):
            if not holds_prefix(row, prefix):
                raise ToolkitError(f"the token ids of input #{i} do not start with the {len(prefix)} query-prompt "
                                   f"tokens this set caches, {prefix}: send the ids /tokenize gives for the text with "
                                   '"prompt_name": "query" (without the closing <|endoftext|>), or send the text with '
                                   '"prompt_name": "query"')

    def _check_dimensions(self, dimensions: int | None) -> None:
        """Refuse an MRL cut wider than the vectors before anything runs (where the model's width is known)."""
        if dimensions is not None and self.model.hidden_size and not 1 <= dimensions <= self.model.hidden_size:
            raise ToolkitError(f"dimensions must be in 1..{self.model.hidden_size} (the model's embedding size), "
                               f"got {dimensions}")

    def _text_rows(self, texts: list[str], instruction: str | None, truncate: bool) -> list[list[int]]:
        return self.model.tokenize(self.model.format(texts, instruction), truncation(truncate))

    def _text_tokens(self, texts: list[str], instruction: str | None, truncate: bool,
                     add_special_tokens: bool) -> list[list[tuple[int, int | None, int | None]]]:
        """`_text_rows` with `Embedder.token_spans`' offsets, moved from the formatted text to the user's (the query
        format puts it last); a token that holds the end of the instruction and the start of the text starts at 0."""
        formatted = self.model.format(texts, instruction)
        rows, spans = self.model.token_spans(formatted, truncation(truncate))
        tokens = []
        for text, read, row, row_spans in zip(texts, formatted, rows, spans):
            start_of_text = len(read) - len(text)
            tokens.append([(t, max(span[0] - start_of_text, 0), span[1] - start_of_text)
                           if span is not None and span[1] > start_of_text else (t, None, None)
                           for t, span in zip(row, row_spans) if add_special_tokens or span is not None])
        return tokens


class RerankService(ServedModel):
    """The reranker: a query and texts → the texts ranked by P(yes), as `Reranker.rerank`."""

    model: Reranker
    warm_up_input = [("warm", "up")]

    async def rerank(self, query: str, texts: list[str], instruction: str | None = None, truncate: bool = False,
                     raw_scores: bool = False, top_n: int | None = None) -> tuple[list[int], np.ndarray, int]:
        """(indices best first, scores in input order, tokens run); scores are P(yes), or log-odds with
        `raw_scores`."""
        self.check_client_batch(len(texts))
        rows = await self.rows(self.model.tokenize, [(query, t) for t in texts], instruction, truncation(truncate))
        raw = await self.run(rows)
        scores = yes_log_odds(raw).astype(np.float32) if raw_scores else self.model.task.finish(raw)
        return rank_order(scores, top_n), scores, sum(map(len, rows))

"""Prometheus metrics of one app, in a registry of its own (several apps in one process do not clash).

- `toolkit_http_requests_total{route, status}` and `toolkit_http_request_seconds{route, status_class}`: every answer,
  by route template (unknown paths count as `unmatched`); the latencies by status class (`2xx`, `4xx`, `5xx`: a flood's
  fast 429s and its clients' 499s apart from the answers, in few series);
- `toolkit_stage_seconds{model, stage}`: per request, `tokenize`, `queue` (until its first row goes to an engine) and
  `inference` (from then until its last batch is done);
- `toolkit_batch_rows{model}`, `toolkit_batch_tokens{model}` (real tokens) and `toolkit_padded_tokens_total{model}`
  per engine batch;
- `toolkit_queue_rows{model}` (rows waiting for a batch) and `toolkit_requests_in_flight{model}`.

`constant_labels` go on every series: a Ray Serve replica's `replica` (each scrape reaches one replica).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from typing_extensions import override

from toolkit.runner import Batch
from toolkit.scheduler import SchedulerObserver

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
POWERS_OF_TWO = tuple(2 ** k for k in range(15))


class ServiceMetrics:
    """The app's metrics; `render()` is the `/metrics` body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.constant_labels: dict[str, str] = {}
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("toolkit_http_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=registry)
        self.request_seconds = Histogram("toolkit_http_request_seconds", "Seconds from request to answer, by route "
                                         "and status class (2xx, 4xx, 5xx)", ["route", "status_class"],
                                         buckets=SECONDS, registry=registry)
        self.stage_seconds = Histogram("toolkit_stage_seconds", "Seconds a request spent in each stage: tokenize, "
                                       "queue (until its first row runs), inference", ["model", "stage"],
                                       buckets=SECONDS, registry=registry)
        self.batch_rows = Histogram("toolkit_batch_rows", "Rows per engine batch", ["model"],
                                    buckets=POWERS_OF_TWO[:9], registry=registry)
        self.batch_tokens = Histogram("toolkit_batch_tokens", "Real (not padding) tokens per engine batch", ["model"],
                                      buckets=POWERS_OF_TWO, registry=registry)
        self.padded_tokens = Counter("toolkit_padded_tokens", "Token slots computed as padding", ["model"],
                                     registry=registry)
        self.queue_rows = Gauge("toolkit_queue_rows", "Rows waiting for a batch", ["model"], registry=registry)
        self.in_flight = Gauge("toolkit_requests_in_flight", "Requests admitted and not yet answered", ["model"],
                               registry=registry)

    def track(self, model: str, queue_rows: Callable[[], float], in_flight: Callable[[], float]) -> None:
        """Read a model's queue depth and requests in flight at every scrape."""
        self.queue_rows.labels(model).set_function(queue_rows)
        self.in_flight.labels(model).set_function(in_flight)

    def observer(self, model: str) -> SchedulerObserver:
        """The scheduler hooks that record a model's batches and per-request queue / inference time."""
        return _SchedulerMetrics(self, model)

    @contextmanager
    def stage(self, model: str, stage: str):
        """Time the block as one request's `stage`."""
        started = time.perf_counter()
        yield
        self.stage_seconds.labels(model, stage).observe(time.perf_counter() - started)

    def answered(self, route: str, status: int, seconds: float) -> None:
        """Count one HTTP answer."""
        self.requests.labels(route, str(status)).inc()
        self.request_seconds.labels(route, f"{status // 100}xx").observe(seconds)

    def render(self) -> bytes:
        """Every metric in the Prometheus text format, with the constant labels."""
        return generate_latest(self)

    def collect(self):
        """The registry's metric families, each sample with the constant labels too (`generate_latest` reads this)."""
        for family in self.registry.collect():
            if self.constant_labels:
                family.samples = [s._replace(labels={**self.constant_labels, **s.labels}) for s in family.samples]
            yield family


class _SchedulerMetrics(SchedulerObserver):
    def __init__(self, metrics: ServiceMetrics, model: str):
        self.metrics, self.model = metrics, model

    @override
    def batch_submitted(self, batch: Batch) -> None:
        m = self.metrics
        m.batch_rows.labels(self.model).observe(len(batch.indices))
        m.batch_tokens.labels(self.model).observe(batch.real_tokens)
        m.padded_tokens.labels(self.model).inc(batch.computed_tokens - batch.real_tokens)

    @override
    def request_finished(self, queued_s: float, inference_s: float) -> None:
        self.metrics.stage_seconds.labels(self.model, "queue").observe(queued_s)
        self.metrics.stage_seconds.labels(self.model, "inference").observe(inference_s)

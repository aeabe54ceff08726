"""Prometheus metrics of the server: one prefix, one registry per app, every bucket set here."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "sd_"
# Whole requests: from a health probe (ms) to a 50-step batch behind a queue (a minute or more).
LATENCY_BUCKETS_S = (0.005, 0.025, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 90, 180)
# Time in the queue: zero when idle, up to a few batches when loaded.
QUEUE_WAIT_BUCKETS_S = (0.001, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)
# One engine call: a tiny CPU model at 2 steps up to batch 16 x 50 steps on a slow GPU.
ENGINE_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
# One denoising step: a tiny CPU model (ms) up to a full batch at 1024x1024 on a slow GPU.
STEP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)

CONTENT_TYPE = CONTENT_TYPE_LATEST


# The metrics of one engine carry its index as label ``engine`` ("0", "1", ...; SD_DEVICES order).
ENGINE_LABEL = "engine"
# Metrics by LoRA adapter set carry label ``adapters``: the set's names from SD_ADAPTERS, sorted and
# joined by "+" (scales left out), "none" without adapters. A name the server does not serve is never
# echoed ("other"), and past MAX_ADAPTER_LABELS distinct sets new ones count as "other" too.
ADAPTERS_LABEL = "adapters"
MAX_ADAPTER_LABELS = 64
NO_ADAPTERS = "none"
OTHER_ADAPTERS = "other"


class AdapterLabels:
    """The values of label ``adapters``, bounded: served names only, at most MAX_ADAPTER_LABELS sets
    (one instance per Metrics, so the bound holds across engines)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def of(self, adapters: Iterable[tuple[str, float]], served: frozenset[str]) -> str:
        names = sorted({name for name, _ in adapters})
        if not names:
            return NO_ADAPTERS
        if not all(name in served for name in names):
            return OTHER_ADAPTERS
        label = "+".join(names)
        if label not in self._seen:
            if len(self._seen) >= MAX_ADAPTER_LABELS:
                return OTHER_ADAPTERS
            self._seen.add(label)
        return label


@dataclass(frozen=True)
class EngineMetrics:
    """One engine's series of the engine-level families (Metrics.for_engine)."""

    batch_size: Histogram
    running_images: Gauge
    step_seconds: Histogram
    admitted_per_step: Histogram
    first_step_wait: Histogram
    images_generated: Counter
    engine_failures: Counter
    # by LoRA adapter set: the families (labelled per call) and the names this engine serves
    label: str
    adapter_images_generated: Counter
    adapter_step_seconds: Histogram
    adapter_labels: AdapterLabels
    served_adapters: frozenset[str]

    def adapters_label(self, adapters: Iterable[tuple[str, float]]) -> str:
        """The ``adapters`` label of an image's (name, scale) pairs."""
        return self.adapter_labels.of(adapters, self.served_adapters)

    def adapter_image(self, adapters: Iterable[tuple[str, float]]) -> None:
        self.adapter_images_generated.labels(self.label, self.adapters_label(adapters)).inc()

    def adapter_step(self, sets: Iterable[Iterable[tuple[str, float]]], seconds: float) -> None:
        """One step's time, once under each adapter set that ran in it."""
        for label in {self.adapters_label(adapters) for adapters in sets}:
            self.adapter_step_seconds.labels(self.label, label).observe(seconds)


class Metrics:
    """The server's metrics. A registry per instance keeps apps in one process (tests) apart.

    Engine-level metrics (images generated and the step loop's) are families labelled ``engine``:
    each engine's lane counts in its own series, ``for_engine(i)``; nothing records in a family
    without saying whose it is.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        e = [ENGINE_LABEL]
        self.requests = Counter(
            f"{PREFIX}requests", "HTTP requests by route and status.", ["route", "status"], registry=r
        )
        self.request_duration = Histogram(
            f"{PREFIX}request_duration_seconds", "HTTP request latency.", ["route"],
            buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            f"{PREFIX}queue_wait_seconds", "Time an image waited in the queue before its engine batch.",
            buckets=QUEUE_WAIT_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(f"{PREFIX}queue_depth", "Images waiting in the queue.", registry=r)
        self.batch_size = Histogram(
            f"{PREFIX}batch_size", "Images per denoising step.",
            e, buckets=BATCH_SIZE_BUCKETS, registry=r,
        )  # fmt: skip
        self.running_images = Gauge(
            f"{PREFIX}running_images", "Images in the engine's running set (step loop).", e, registry=r
        )
        self.step_seconds = Histogram(
            f"{PREFIX}step_seconds", "One denoising step of the running set (engine.step() only).",
            e, buckets=STEP_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.admitted_per_step = Histogram(
            f"{PREFIX}admitted_per_step", "Images admitted to the running set at a step boundary.",
            e, buckets=BATCH_SIZE_BUCKETS, registry=r,
        )  # fmt: skip
        self.first_step_wait = Histogram(
            f"{PREFIX}time_to_first_step_seconds", "Time from arrival to the end of an image's first step.",
            e, buckets=QUEUE_WAIT_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.engine_batch_seconds = Histogram(
            f"{PREFIX}engine_batch_seconds",
            "Engine time per step-loop iteration: admissions, the steps until something is handed back, "
            "decodes.",
            buckets=ENGINE_BUCKETS_S,
            registry=r,
        )
        self.images_generated = Counter(f"{PREFIX}images_generated", "Images generated.", e, registry=r)
        self.adapter_images_generated = Counter(
            f"{PREFIX}adapter_images_generated", "Images generated (step loop), by LoRA adapter set.",
            [ENGINE_LABEL, ADAPTERS_LABEL], registry=r,
        )  # fmt: skip
        self.adapter_step_seconds = Histogram(
            f"{PREFIX}adapter_step_seconds", "Step-loop iterations, once per LoRA adapter set in the step.",
            [ENGINE_LABEL, ADAPTERS_LABEL], buckets=STEP_BUCKETS_S, registry=r,
        )  # fmt: skip
        self._adapter_labels = AdapterLabels()
        self.engines_serving = Gauge(
            f"{PREFIX}engines_serving", "Engines in rotation (SD_DEVICES); drops when one is taken out.",
            registry=r,
        )  # fmt: skip
        self.engine_failures = Counter(
            f"{PREFIX}engine_failures", "Failed engine steps that were not out of memory.", e, registry=r
        )
        self.images_flagged = Counter(
            f"{PREFIX}images_flagged", "Images the safety checker flagged (sent black).", registry=r
        )
        self.rejections = Counter(
            f"{PREFIX}rejections", "Requests refused with 429 (queue full).", registry=r
        )
        self.connections_closed = Counter(
            f"{PREFIX}connections_closed", "Connections the server closed on its client: header_limit "
            "(431), send_timeout (answer not read), header_timeout.", ["reason"], registry=r,
        )  # fmt: skip
        self.timeouts = Counter(f"{PREFIX}timeouts", "Requests that ran out of time (504).", registry=r)
        self.model_load_seconds = Gauge(
            f"{PREFIX}model_load_seconds", "Seconds the model took to load and warm up.", registry=r
        )

        # Jobs that outlive their request (service/web/jobs): the store's, as this replica last read them.
        self.jobs = Gauge(f"{PREFIX}jobs", "Jobs in the store, by state.", ["state"], registry=r)
        self.jobs_finished = Counter(
            f"{PREFIX}jobs_finished", "Jobs this replica finished, by state.", ["state"], registry=r
        )
        self.job_store_bytes = Gauge(
            f"{PREFIX}job_store_bytes", "Bytes of bodies and results in the job store.", registry=r
        )
        self.webhook_deliveries = Counter(
            f"{PREFIX}webhook_deliveries", "Webhook attempts, by event and outcome (delivered, retry, "
            "failed, refused).", ["event", "outcome"], registry=r,
        )  # fmt: skip

        # Several models behind one endpoint (SD_MODELS): per model of each engine's device.
        m = [ENGINE_LABEL, "model"]
        self.model_images = Counter(f"{PREFIX}model_images", "Images generated, by model.", m, registry=r)
        self.model_loads = Counter(
            f"{PREFIX}model_loads", "Models put on a device, by where they came from (disk, host memory).",
            [*m, "source"], registry=r,
        )  # fmt: skip
        self.model_switch_seconds = Histogram(
            f"{PREFIX}model_switch_seconds", "Seconds a model took to get on a device, by source.",
            ["source"], buckets=ENGINE_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.model_evictions = Counter(
            f"{PREFIX}model_evictions", "Models taken off a device.", m, registry=r
        )
        self.model_resident_bytes = Gauge(
            f"{PREFIX}model_resident_bytes", "Bytes of each model on a device (shared parts in each).", m,
            registry=r,
        )  # fmt: skip
        self._engines: dict[int, EngineMetrics] = {}

    def model_event(self, engine: int, kind: str, model: str, value: float, resident: dict[str, int]) -> None:
        """A model was loaded ("load_disk", "load_host": ``value`` seconds) or evicted ("evict") on
        ``engine``'s device, or only its bytes changed ("resident"); ``resident``: each model's bytes
        on it now."""
        label = str(engine)
        if kind == "evict":
            self.model_evictions.labels(label, model).inc()
        elif kind.startswith("load_"):  # else only the bytes change (the lane's first report)
            source = kind.removeprefix("load_")
            self.model_loads.labels(label, model, source).inc()
            self.model_switch_seconds.labels(source).observe(value)
        for name in {model, *resident}:
            self.model_resident_bytes.labels(label, name).set(resident.get(name, 0))

    def for_engine(self, index: int, adapters: Collection[str] = ()) -> EngineMetrics:
        """Engine ``index``'s series of the engine-level families, made at the first call and the
        same object at every later one; ``adapters``: the names of SD_ADAPTERS it serves (the only
        names its adapter labels may carry)."""
        if index not in self._engines:
            label = str(index)
            self._engines[index] = EngineMetrics(
                batch_size=self.batch_size.labels(label),
                running_images=self.running_images.labels(label),
                step_seconds=self.step_seconds.labels(label),
                admitted_per_step=self.admitted_per_step.labels(label),
                first_step_wait=self.first_step_wait.labels(label),
                images_generated=self.images_generated.labels(label),
                engine_failures=self.engine_failures.labels(label),
                label=label,
                adapter_images_generated=self.adapter_images_generated,
                adapter_step_seconds=self.adapter_step_seconds,
                adapter_labels=self._adapter_labels,
                served_adapters=frozenset(adapters),
            )
        return self._engines[index]

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

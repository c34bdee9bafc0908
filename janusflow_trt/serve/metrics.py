"""Prometheus metrics, one registry per app (several apps in one process, as in the tests, stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("janusflow_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("janusflow_request_latency_seconds", "request start to the last byte sent",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("janusflow_time_to_first_token_seconds", "chat: request start to the first text",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.output_tokens = Counter("janusflow_output_tokens", "answer tokens generated (rate() = tokens/s)",
                                     registry=r)
        self.images = Counter("janusflow_images_generated", "images generated", registry=r)
        self.queue_depth = Gauge("janusflow_queue_depth", "requests waiting for the engine", registry=r)
        self.running = Gauge("janusflow_running_requests", "requests the engine is running (batch occupancy)",
                             registry=r)
        self.running_images = Gauge("janusflow_running_image_requests",
                                    "image requests in the Euler-step batch (--max-batch > 1)", registry=r)
        self.step_images = Histogram("janusflow_euler_step_images", "images in each batched Euler step call",
                                     buckets=(1, 2, 3, 4, 6, 8, 12, 16), registry=r)
        self.euler_round = Histogram("janusflow_euler_round_seconds", "one image round: admissions (their "
                                     "prefix prefill) and one batched Euler step call (VAE decodes run "
                                     "on a thread of their own, except on capturable backends)",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.first_step = Histogram("janusflow_time_to_first_euler_step_seconds",
                                    "images: request start to its first Euler step done", buckets=LATENCY_BUCKETS,
                                    registry=r)

"""Workflow metrics, registered in the daemon's registry (thread-safe: the runner updates
them from its own thread)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_STEP = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class WorkflowMetrics:
    def __init__(self, r: CollectorRegistry) -> None:
        self.submitted = Counter("citadel_workflows_submitted", "Workflows accepted (202)",
                                 registry=r)
        self.rejected = Counter("citadel_workflows_rejected",
                                "Workflow submissions refused, by reason", ["reason"],
                                registry=r)
        self.finished = Counter("citadel_workflows_finished",
                                "Workflows that reached a final state, by status", ["status"],
                                registry=r)
        self.failures = Counter("citadel_workflow_step_failures",
                                "Failed step attempts by type and kind (retryable or final)",
                                ["type", "kind"], registry=r)
        self.active = Gauge("citadel_workflows_active", "Workflows running in this daemon",
                            registry=r)
        self.queue_depth = Gauge("citadel_workflows_queue_depth",
                                 "Workflows waiting to be run (shared queue: all instances)",
                                 registry=r)
        self.step_duration = Histogram("citadel_workflow_step_duration_seconds",
                                       "Step duration (all attempts) by type and outcome",
                                       ["type", "outcome"], buckets=_STEP, registry=r)
        self.duration = Histogram("citadel_workflow_duration_seconds",
                                  "Submit to final state, by status", ["status"],
                                  buckets=_STEP, registry=r)
        self.reclaimed = Counter("citadel_workflows_reclaimed",
                                 "Jobs taken over from a silent instance or resumed after a"
                                 " restart", registry=r)
        self.lost_claims = Counter("citadel_workflows_lost_claims",
                                   "Running workflows stopped because another instance took"
                                   " their lease", registry=r)

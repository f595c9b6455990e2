"""Ray Serve replicas as latency-critical lithos clients on a TPC slice.

    from ray import serve
    import lithos_ray.serve

    @lithos_ray.serve.deployment(tpc=12, slo_ms=50,
                                 autoscaling_config=lithos_ray.serve.slo_autoscaling(max_replicas=4))
    class Model:
        def __call__(self, request): ...

    serve.run(Model.bind())

`deployment(tpc=..., slo_ms=..., **serve_kwargs)` is `serve.deployment(**serve_kwargs)` plus:
- `ray_actor_options` gets `resources={"lithos_tpc": tpc}` and the env vars LITHOS_PRIORITY=
  latency_critical and LITHOS_SLO_MS (and LITHOS_GPU_INDEX), so the lithos worker hook grants each
  replica `tpc` TPCs on one GPU before the replica starts, and its SLO reaches the GPU's agent;
- the replica's `__init__` and its sync request methods run on one model thread, one request at a
  time in arrival order (`model_thread=True`, the default): PyTorch on a thread that has not run
  the model before pays for it (60-75 ms per BERT-base request on the H100, with or without lithos:
  benchmarks/results/native_interference_threads.json), and Serve's thread pool hands requests to
  whichever thread is free. Async methods run on Serve's event loop, streaming (generator) methods
  in Serve's threads; `model_thread=False` gives Serve's own threading back;
- every public method (and `__call__`) is timed by the replica; latencies go to the
  `ray_lithos_client_*` metrics, to the lithos dashboard, and to Serve's autoscaler through
  `record_autoscaling_stats` (lithos_slo_attainment, lithos_slice_busy_fraction); a replica's
  `lithos_latency_summary()` returns them (p50/p99, attainment, busy fraction) through a handle.

`SloAutoscalingPolicy` is a Serve custom autoscaling policy that scales on SLO attainment and slice
use as well as queue length, capped by a placement plan when one is given. `slo_autoscaling(...)`
builds the `autoscaling_config` that uses it.
"""
from __future__ import annotations

import concurrent.futures
import contextvars
import functools
import inspect
import math
import threading
import time

from .errors import LithosNotRunning, LithosRequestError

POLICY_IMPORT_PATH = "lithos_ray.serve:SloAutoscalingPolicy"
STAT_SLO_ATTAINMENT = "lithos_slo_attainment"
STAT_SLICE_BUSY_FRACTION = "lithos_slice_busy_fraction"
STAT_REQUESTS = "lithos_requests_in_window"
DEFAULT_TARGET_SLO_ATTAINMENT = 0.99
DEFAULT_TARGET_SLICE_BUSY_FRACTION = 0.6
DEFAULT_LATENCY_WINDOW_S = 30.0
# Serve calls these itself; they are not requests.
_NOT_TIMED = frozenset({"reconfigure", "check_health", "record_autoscaling_stats", "record_routing_stats",
                        "record_replica_metadata", "lithos_latency_summary"})


# -- the deployment option ----------------------------------------------------------------------
def deployment(_class=None, *, tpc: int, slo_ms: float, gpu_index: int | None = None,
               acquire_timeout_s: float | None = None, latency_window_s: float = DEFAULT_LATENCY_WINDOW_S,
               model_thread: bool = True, **serve_kwargs):
    """`@lithos_ray.serve.deployment(tpc=12, slo_ms=50, **serve.deployment kwargs)` on a class
    (model_thread: see the module's docstring)."""
    from ray import serve

    from .api import ray_options
    from .placement_ray import SERVE_ALLOWED_ACTOR_OPTIONS

    if slo_ms is None:
        raise LithosRequestError("a lithos Serve deployment is latency-critical: give slo_ms (> 0), the latency "
                                 "objective of one request in milliseconds")
    if not isinstance(model_thread, bool):
        raise LithosRequestError(f"model_thread must be True or False, got {model_thread!r}")
    if not (isinstance(latency_window_s, (int, float)) and 1 <= latency_window_s <= 3600):
        raise LithosRequestError(f"latency_window_s must be 1..3600 seconds, got {latency_window_s!r}")
    user_actor_options = dict(serve_kwargs.pop("ray_actor_options", None) or {})
    not_allowed = sorted(set(user_actor_options) - SERVE_ALLOWED_ACTOR_OPTIONS)
    if not_allowed:
        raise LithosRequestError(f"ray_actor_options has {not_allowed}, which Serve does not accept (Serve places "
                                 f"replicas itself; use gpu_index= to pick the GPU); allowed: "
                                 f"{sorted(SERVE_ALLOWED_ACTOR_OPTIONS)}")
    actor_options = ray_options(tpc, "latency_critical", slo_ms, gpu_index, acquire_timeout_s, **user_actor_options)

    def wrap(cls):
        if not inspect.isclass(cls):
            raise LithosRequestError(f"lithos_ray.serve.deployment takes a class, got {cls!r}; put a function "
                                     f"into a class's __call__")
        return serve.deployment(ray_actor_options=actor_options, **serve_kwargs)(
            _instrument(cls, float(slo_ms), float(latency_window_s), model_thread))

    return wrap(_class) if _class is not None else wrap


class _ModelThread:
    """One thread that runs calls one at a time, in the order they come (a FIFO executor)."""

    def __init__(self):
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lithos-model")
        self._ident = self._executor.submit(threading.get_ident).result()

    def is_current(self) -> bool:
        return threading.get_ident() == self._ident

    def call(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on the model thread with the caller's context variables (Serve's request
        context); blocks the calling thread until it returns, and raises what it raised."""
        return self._executor.submit(contextvars.copy_context().run, fn, *args, **kwargs).result()


def _instrument(cls, slo_ms: float, window_s: float, model_thread: bool):
    """A subclass of `cls` whose requests are timed (and run on its model thread) and whose autoscaling
    stats carry lithos signals."""
    original_init = cls.__init__
    user_stats = getattr(cls, "record_autoscaling_stats", None)
    namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}

    def __init__(self, *args, **kwargs):
        self._lithos_recorder = _replica_recorder(slo_ms, window_s)
        self._lithos_model_thread = _ModelThread() if model_thread else None
        if self._lithos_model_thread:
            self._lithos_model_thread.call(original_init, self, *args, **kwargs)
        else:
            original_init(self, *args, **kwargs)

    def lithos_stats(self) -> dict:
        summary = self._lithos_recorder.summary()
        stats = {STAT_SLICE_BUSY_FRACTION: summary.slice_busy_fraction, STAT_REQUESTS: summary.requests}
        if summary.slo_attainment is not None:
            stats[STAT_SLO_ATTAINMENT] = summary.slo_attainment
        return stats

    if user_stats is not None and inspect.iscoroutinefunction(user_stats):
        async def record_autoscaling_stats(self):
            return {**(await user_stats(self)), **lithos_stats(self)}
    else:
        def record_autoscaling_stats(self):
            return {**(user_stats(self) if user_stats else {}), **lithos_stats(self)}

    def lithos_latency_summary(self) -> dict:
        """This replica's latencies over its window (lithos_ray.metrics.LatencySummary as a dict)."""
        return self._lithos_recorder.summary().to_dict()

    namespace.update(__init__=functools.wraps(original_init)(__init__),
                     record_autoscaling_stats=record_autoscaling_stats, lithos_latency_summary=lithos_latency_summary)
    for name in dir(cls):
        if name in _NOT_TIMED or (name.startswith("_") and name != "__call__"):
            continue
        static = inspect.getattr_static(cls, name)
        if not inspect.isfunction(static):   # staticmethod, classmethod, property, attribute
            continue
        if inspect.isgeneratorfunction(static) or inspect.isasyncgenfunction(static):
            continue                         # streaming responses are not timed
        namespace[name] = _timed(static)
    return type(cls.__name__, (cls,), namespace)


def _timed(method):
    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def timed_async(self, *args, **kwargs):
            start_s = time.monotonic()
            try:
                return await method(self, *args, **kwargs)
            finally:
                self._lithos_recorder.observe(start_s, time.monotonic())
        return timed_async

    @functools.wraps(method)
    def timed(self, *args, **kwargs):
        start_s = time.monotonic()
        try:
            runner = self._lithos_model_thread
            if runner is None or runner.is_current():   # off, or one request method calling another
                return method(self, *args, **kwargs)
            return runner.call(method, self, *args, **kwargs)
        finally:
            self._lithos_recorder.observe(start_s, time.monotonic())
    return timed


def _replica_recorder(slo_ms: float, window_s: float):
    from ray import serve

    from .client import current_grant
    from .metrics import ClientLatencyRecorder

    grant = current_grant()
    if grant is None:
        raise LithosNotRunning("this Serve replica got no lithos grant: its node does not run the lithos worker "
                               "hook; start the node with `lithos-ray start`")
    context = serve.get_replica_context()
    client = f"{context.app_name}/{context.deployment}#{context.replica_id.unique_id}"
    return ClientLatencyRecorder(client, slo_ms, grant.grant_id, grant.gpu_uuid, window_s)


# -- autoscaling --------------------------------------------------------------------------------
def plan_replica_limit(plan: dict, model: str) -> int:
    """Replicas of `model` the placement plan (Plan.to_dict()) reserved TPCs for."""
    placements = plan.get("placements") if isinstance(plan, dict) else None
    if not isinstance(placements, list):
        raise LithosRequestError("plan must be a placement plan as a dict (lithos_ray.placement Plan.to_dict())")
    count = sum(1 for p in placements if p.get("model") == model)
    if count == 0:
        models = sorted({p.get("model") for p in placements})
        raise LithosRequestError(f"the plan has no replica of model {model!r}; models in the plan: {models}")
    return count


def desired_replicas(current_replicas: int, slo_attainments: list[float], slice_busy_fractions: list[float],
                     ongoing_requests: float, target_ongoing_requests: float,
                     target_slo_attainment: float = DEFAULT_TARGET_SLO_ATTAINMENT,
                     target_slice_busy_fraction: float = DEFAULT_TARGET_SLICE_BUSY_FRACTION,
                     plan_limit: int | None = None) -> tuple[int, str]:
    """The replica count to aim for, and why. Pure: numbers in, decision out.

    - use: enough replicas that the mean slice busy fraction comes to target_slice_busy_fraction;
    - queue: enough that ongoing requests per replica come to target_ongoing_requests (Serve's rule);
    - SLO: while mean attainment is under target, at least one more replica, never fewer;
    - plan: never more replicas than the placement plan reserved TPCs for.
    """
    if current_replicas <= 0:
        return (1 if ongoing_requests > 0 else 0), "no replicas running"
    reasons = []
    by_use = current_replicas
    if slice_busy_fractions:
        mean_busy = sum(slice_busy_fractions) / len(slice_busy_fractions)
        by_use = math.ceil(current_replicas * mean_busy / target_slice_busy_fraction - 1e-9)
        reasons.append(f"slice use {mean_busy:.2f} -> {by_use}")
    by_queue = math.ceil(ongoing_requests / target_ongoing_requests - 1e-9) if target_ongoing_requests > 0 else 0
    reasons.append(f"queue {ongoing_requests:g} -> {by_queue}")
    desired = max(by_use, by_queue, 1)
    if slo_attainments:
        attainment = sum(slo_attainments) / len(slo_attainments)
        if attainment < target_slo_attainment:
            desired = max(desired, current_replicas + 1)
            reasons.append(f"SLO attainment {attainment:.3f} < {target_slo_attainment:g}: scale up")
        else:
            reasons.append(f"SLO attainment {attainment:.3f} ok")
    if plan_limit is not None and desired > plan_limit:
        desired = plan_limit
        reasons.append(f"capped at the plan's {plan_limit} replicas")
    return desired, "; ".join(reasons)


class SloAutoscalingPolicy:
    """Serve custom autoscaling policy (class form: Serve builds it once with policy_kwargs and calls it
    with an AutoscalingContext each control-loop tick). Serve applies min/max_replicas and the
    up/downscale delays around it."""

    def __init__(self, target_slo_attainment: float = DEFAULT_TARGET_SLO_ATTAINMENT,
                 target_slice_busy_fraction: float = DEFAULT_TARGET_SLICE_BUSY_FRACTION,
                 plan: dict | None = None, plan_model: str | None = None):
        if not 0 < target_slo_attainment <= 1:
            raise LithosRequestError(f"target_slo_attainment must be in (0, 1], got {target_slo_attainment!r}")
        if not 0 < target_slice_busy_fraction <= 1:
            raise LithosRequestError(f"target_slice_busy_fraction must be in (0, 1], got "
                                     f"{target_slice_busy_fraction!r}")
        if (plan is None) != (plan_model is None):
            raise LithosRequestError("give both plan and plan_model (the plan's model this deployment serves), "
                                     "or neither")
        self.target_slo_attainment = target_slo_attainment
        self.target_slice_busy_fraction = target_slice_busy_fraction
        self.plan_limit = plan_replica_limit(plan, plan_model) if plan is not None else None

    def __call__(self, ctx) -> tuple[int, dict]:
        metrics = ctx.aggregated_metrics or {}
        running = set(ctx.running_replicas)
        attainments = [v for r, v in (metrics.get(STAT_SLO_ATTAINMENT) or {}).items() if r in running]
        busy = [v for r, v in (metrics.get(STAT_SLICE_BUSY_FRACTION) or {}).items() if r in running]
        target_ongoing = ctx.config.get_target_ongoing_requests() if ctx.config is not None else 0.0
        replicas, reason = desired_replicas(
            ctx.current_num_replicas, attainments, busy, ctx.total_num_requests, target_ongoing,
            self.target_slo_attainment, self.target_slice_busy_fraction, self.plan_limit)
        return replicas, {"lithos_decision": reason}


def slo_autoscaling(min_replicas: int = 1, max_replicas: int | None = None,
                    target_slo_attainment: float = DEFAULT_TARGET_SLO_ATTAINMENT,
                    target_slice_busy_fraction: float = DEFAULT_TARGET_SLICE_BUSY_FRACTION,
                    plan: dict | None = None, plan_model: str | None = None, **autoscaling_kwargs) -> dict:
    """An `autoscaling_config` (dict) that scales with SloAutoscalingPolicy.

    max_replicas defaults to the plan's replica count of plan_model; without a plan it is required.
    Other Serve autoscaling keys (upscale_delay_s, downscale_delay_s, look_back_period_s,
    target_ongoing_requests, ...) pass through.
    """
    policy = SloAutoscalingPolicy(target_slo_attainment, target_slice_busy_fraction, plan, plan_model)
    if max_replicas is None:
        if policy.plan_limit is None:
            raise LithosRequestError("give max_replicas, or a plan (and plan_model) to take it from")
        max_replicas = policy.plan_limit
    elif policy.plan_limit is not None and max_replicas > policy.plan_limit:
        raise LithosRequestError(f"max_replicas={max_replicas}, but the plan reserves TPCs for only "
                                 f"{policy.plan_limit} replica(s) of {plan_model!r}")
    if not (isinstance(min_replicas, int) and isinstance(max_replicas, int) and 0 <= min_replicas <= max_replicas):
        raise LithosRequestError(f"need whole numbers 0 <= min_replicas <= max_replicas, got {min_replicas!r} and "
                                 f"{max_replicas!r}")
    kwargs = {"target_slo_attainment": target_slo_attainment,
              "target_slice_busy_fraction": target_slice_busy_fraction}
    if plan is not None:
        kwargs.update(plan=plan, plan_model=plan_model)
    return {"min_replicas": min_replicas, "max_replicas": max_replicas, **autoscaling_kwargs,
            "policy": {"policy_function": POLICY_IMPORT_PATH, "policy_kwargs": kwargs}}

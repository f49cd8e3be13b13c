"""Monitoring blueprint: health, live request progress, recent requests, Prometheus metrics."""

from __future__ import annotations

import os
import time

from flask import Blueprint, Response, current_app, jsonify

from ..core.engine.rpc import hello
from ..core.errors import NotFound
from ..metrics import CONTENT_TYPE, GpuSnapshot, ServiceMetrics, gpu_snapshot
from .handlers import services

bp = Blueprint("monitoring", __name__)


def loaded_models_view(gpu: GpuSnapshot | None = None) -> list[dict]:
    """The loaded models with their engine state (health, dashboard, /api/ps share it).

    ``gpu_memory_mib`` is the memory the engine's process holds on the GPUs (from ``gpu``, a
    snapshot the caller took), None without a GPU.
    """
    now = time.monotonic()
    out = []
    for entry in services().manager.loaded():
        engine = entry.engine
        out.append({
            "name": entry.info.name,
            "state": engine.state.value,
            "pid": engine.pid,
            "port": engine.port,
            "context_length": entry.ctx_size,
            "size": entry.info.size,
            "in_flight": entry.in_flight,
            "expires_in_s": (None if entry.expires_at is None
                             else round(max(0.0, entry.expires_at - now), 1)),
            "restarts": engine.restarts,
            "devices": engine.report.devices() if hasattr(engine, "report") else [],
            "rpc_servers": list(getattr(engine.settings, "rpc_servers", []) or [])
            if hasattr(engine, "settings") else [],
            "gpu_memory_mib": (None if gpu is None or engine.pid is None
                               else gpu.by_pid.get(engine.pid, 0.0)),
        })
    return out


def rpc_workers_view() -> list[dict]:
    """Each configured RPC worker: in use by a running engine of ours, or probed now.

    A worker serves one llama-server at a time and queues other connections, so one that a
    running engine holds is not probed (the probe would only wait in its queue).
    """
    manager = services().manager
    in_use = manager.workers_in_use()
    out = []
    for endpoint in manager.rpc_workers():
        if endpoint in in_use:
            out.append({"endpoint": endpoint, "reachable": True, "state": "in_use",
                        "error": None, "in_use_by": in_use[endpoint]})
            continue
        status = hello(endpoint, timeout=0.5)
        out.append({"endpoint": endpoint,
                    "reachable": status.state in ("ready", "busy"),
                    "state": status.state, "error": None if status.usable else
                    status.describe(), "in_use_by": []})
    return out


def app_metrics() -> ServiceMetrics:
    """The ServiceMetrics of the current app."""
    return current_app.extensions["ollama_server_metrics"]


def load_view() -> dict:
    """Slots and queue over the loaded models, and the balancer weight they give (1-100).

    The weight is the share of the slots that are free, less what waits in the queues: 100
    when idle (or when nothing is loaded), 1 (never 0, which HAProxy reads as "drained") once
    every slot is busy or requests wait.
    """
    manager = services().manager
    queues = manager.queue.snapshot()
    total = sum(manager.parallel_for(name) for name in queues) if queues else 0
    busy = int(sum(q["busy"] for q in queues.values()))
    waiting = int(sum(q["waiting"] for q in queues.values()))
    weight = 100 if total == 0 else round(100 * (total - busy - waiting) / total)
    return {"slots_total": total, "slots_busy": busy, "requests_waiting": waiting,
            "weight": max(1, min(100, weight))}


def _json(body: dict, status: int) -> Response:
    return Response(jsonify(body).get_data(), status=status, mimetype="application/json")


@bp.get("/health/live")
def live() -> Response:
    """Liveness: 200 while this process answers; the models and engines are not looked at."""
    return _json({"status": "alive", "pid": os.getpid()}, 200)


@bp.get("/health/ready")
def ready() -> Response:
    """Readiness, for a balancer's health check (and agent.py's weight): 200 when this
    instance takes new work; 503 while it drains, preloads, or its default model cannot start.
    Cheap: no RPC probe, no GPU reading."""
    svc = services()
    body: dict = {"status": "ready", "instance": svc.config.instance_name}
    try:
        body.update(load_view())
        preloading = svc.manager.preloading()
        default = (svc.manager.default_model_name() or "").lower()
        failed = [f for f in svc.manager.failed_models()
                  if f["name"].lower() in (default, f"{default}:latest")]
    except Exception as exc:  # noqa: BLE001 - a probe reports, never raises
        return _json({**body, "status": "unhealthy", "error": str(exc)}, 503)
    if svc.config.draining():
        return _json({**body, "status": "draining",
                      "error": f"draining: {svc.config.drain_path} exists"}, 503)
    if preloading:
        return _json({**body, "status": "starting", "preloading": preloading}, 503)
    if failed:
        return _json({**body, "status": "unhealthy",
                      "error": f"{failed[0]['name']}: {failed[0]['error']}"}, 503)
    return _json(body, 200)


@bp.get("/health")
def health() -> Response:
    """200 with the engine and models when the service can take work, 503 otherwise.

    A model whose last start failed is listed under ``failed_models`` with the reason: the
    status is ``unhealthy`` (503) when it is the default model, else ``degraded`` (200).
    While the instance drains (``drain_file``) the status is ``draining`` (503).
    """
    svc = services()
    gpu = gpu_snapshot()
    # Which process answered, and when and from where its configuration was loaded (reload).
    body: dict = {"status": "ok", "models_loaded": [], "requests_in_flight": 0,
                  "gpu": None if gpu is None else gpu.to_dict(), "pid": os.getpid(),
                  "engine_pool": None,
                  "config": current_app.extensions["ollama_server_reloader"].status()}
    # Several workers: the process that owns the engines, and its own configuration.
    pool_status = getattr(svc.manager, "pool_status", None)
    try:
        if pool_status is not None:  # a pool that died and is starting again: 503
            body["engine_pool"] = {"pid": None, "workers": [], "config": None}
            body["engine_pool"] = pool_status()
        body["models_loaded"] = loaded_models_view(gpu)
        body["requests_in_flight"] = svc.tracker.count_active()
        body["engine"] = str(svc.manager.engine_settings().binary)
        body["models_available"] = len(svc.manager.list_models())
        body["default_model"] = svc.manager.default_model_name()
        preloading = svc.manager.preloading()
    except Exception as exc:  # noqa: BLE001 - health reports, never raises
        body.update(status="unhealthy", error=str(exc))
        return _json(body, 503)
    if preloading:  # not ready until the models of ``preload`` are loaded (or failed)
        body.update(status="starting", preloading=preloading)
        return _json(body, 503)
    if svc.config.draining():  # a balancer sends no new work; requests in flight finish
        body.update(status="draining", error=f"draining: {svc.config.drain_path} exists")
        return _json(body, 503)
    workers = rpc_workers_view()
    if workers:
        body["rpc_workers"] = workers
        down = [w for w in workers if w["state"] not in ("ready", "in_use")]
        if down:
            body["status"] = "degraded"
            body["error"] = "; ".join(f"RPC worker {w['endpoint']}: {w['error']}" for w in down)
    failed = svc.manager.failed_models()
    if failed:
        body["failed_models"] = failed
        default = (svc.manager.default_model_name() or "").lower()
        default_failed = any(f["name"].lower() in (default, f"{default}:latest")
                             for f in failed)
        body["status"] = "unhealthy" if default_failed else "degraded"
        body["error"] = f"{failed[0]['name']}: {failed[0]['error']}"
        if default_failed:
            return _json(body, 503)
    return jsonify(body)


def request_views(statuses: list) -> list[dict]:
    """The statuses as dicts; one waiting for a slot also gets its place in its model's line
    (``queue_position``, 1: next; ``queue_length``) and its priority class."""
    views = [s.to_dict() for s in statuses]
    if any(v["state"] == "queued" for v in views):
        svc = services()
        try:
            places = svc.manager.queue.positions()
        except Exception:  # noqa: BLE001 - a view shows what it can
            places = {}
        for view in views:
            place = places.get(view["id"])
            if place is not None:
                view.update(queue_position=place["position"], queue_length=place["waiting"],
                            priority=svc.config.key_priority(view.get("caller")))
    return views


@bp.get("/api/progress/<request_id>")
def progress(request_id: str) -> Response:
    """Live status of one request (tokens so far, time to first token, tokens/s; its place
    in the queue while it waits for a slot)."""
    status = services().tracker.get(request_id)
    if status is None:
        raise NotFound(f"request '{request_id}' not found")
    return jsonify(request_views([status])[0])


@bp.get("/api/requests")
def requests_list() -> Response:
    """Requests in flight and recently finished, with totals."""
    tracker = services().tracker
    return jsonify({"active": request_views(tracker.active()),
                    "recent": [s.to_dict() for s in tracker.recent()],
                    "totals": tracker.totals_now()})


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text: the service's metrics plus vLLM's and TGI's names (see metrics.py)."""
    return Response(app_metrics().render(), status=200, content_type=CONTENT_TYPE)

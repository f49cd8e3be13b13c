"""The scale-out pieces one layer at a time (issue 21): HAProxy's rendered configuration (checked
by the real haproxy), the agent's answers and its socket, the readiness routes and the
X-Served-By header over the Flask client, and the new configuration keys."""

from __future__ import annotations

import socket
import subprocess

import pytest

from ollama_server.agent import READY_ECHO_S, LoadAgent, local_url
from ollama_server.cluster import (
    AGENT_OFFSET,
    _service_args,
    find_haproxy,
    plan,
    render_haproxy,
)
from ollama_server.config import ConfigError, load_config
from tests.helpers import free_port, wait_for


def config(tmp_path, **overrides):
    return load_config(overrides={"log_dir": str(tmp_path / "logs"), "workers": "1",
                                  **overrides}, environ={})


# --- HAProxy's configuration ----------------------------------------------------------------

def test_the_rendered_configuration_is_valid_haproxy(tmp_path):
    cfg = config(tmp_path, port=21000, cluster_hash_balance_factor=175,
                 cluster_queue_timeout=12)
    text = render_haproxy(cfg, plan(cfg, 3), stats_socket=tmp_path / "h.sock")
    path = tmp_path / "haproxy.cfg"
    path.write_text(text)
    check = subprocess.run([find_haproxy(), "-c", "-f", str(path)], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "bind 127.0.0.1:21000" in text
    assert "hash-balance-factor 175" in text and "balance hash var(txn.model)" in text
    assert "timeout queue 12000ms" in text
    assert "hdr Retry-After 5" in text  # the balancer's own 503
    for i in (1, 2, 3):
        assert (f"server inst{i} 127.0.0.1:{21000 + i} check maxconn 64 agent-check "
                f"agent-port {21000 + AGENT_OFFSET + i}") in text
        assert f"track by_load/inst{i}" in text


def test_a_broken_configuration_is_what_haproxy_refuses(tmp_path):
    # The check above can fail: haproxy -c refuses a backend that tracks a missing server.
    cfg = config(tmp_path, port=21000)
    text = render_haproxy(cfg, plan(cfg, 2)).replace("track by_load/inst2", "track by_load/x")
    path = tmp_path / "haproxy.cfg"
    path.write_text(text)
    assert subprocess.run([find_haproxy(), "-c", "-f", str(path)],
                          capture_output=True).returncode != 0


def test_plan_gives_each_instance_its_ports_and_drain_file(tmp_path):
    cfg = config(tmp_path, port=30000)
    insts = plan(cfg, 2)
    assert [(i.name, i.port, i.agent_port) for i in insts] == [
        ("inst1", 30001, 30101), ("inst2", 30002, 30102)]
    assert insts[0].drain_file == tmp_path / "logs" / "cluster" / "inst1.drain"
    with pytest.raises(ConfigError, match="no room"):
        plan(config(tmp_path, port=65500), 3)
    with pytest.raises(ConfigError, match="at least one"):
        plan(cfg, 0)


def test_the_instances_get_the_service_flags_but_not_the_balancers():
    argv = ["run", "--instances", "3", "--model-dir", "/m", "--host", "0.0.0.0",
            "--port=9000", "-n", "2", "--parallel", "4", "--ready-timeout", "9"]
    assert _service_args(argv) == ["--model-dir", "/m", "--parallel", "4"]


# --- the agent ------------------------------------------------------------------------------

def test_the_agent_answers_from_the_instances_readiness():
    agent = LoadAgent("127.0.0.1", 1, "http://unused")
    assert agent.reply(now=0) == "drain"  # not ready yet
    agent.observe(200, {"status": "ready", "weight": 75}, now=10)
    assert agent.reply(now=10) == "ready 75%"  # "ready" ends a drain the agent asked for
    later = agent._not_ready_at + READY_ECHO_S + 1
    assert agent.reply(now=later) == "75%"  # then leaves HAProxy's own admin state alone
    agent.observe(503, {"status": "draining"}, now=later)
    assert agent.reply(now=later) == "drain"
    agent.observe(200, {"status": "ready", "weight": 0}, now=later + 1)
    assert agent.reply(now=later + 1) == "ready 1%"  # 0 would mean drained to HAProxy
    agent.observe(None, None, now=later + 2)  # no answer: the last weight stands
    assert agent.reply(now=later + 2) == "ready 1%"
    agent.observe(503, {"status": "starting"}, now=later + 3)
    assert agent.reply(now=later + 3) == "drain"
    agent.observe(200, {"status": "ready", "weight": 100}, now=later + 4)
    agent.stopping()
    assert agent.reply(now=later + 4) == "drain"


def test_the_agent_serves_its_line_on_its_port():
    port = free_port()
    agent = LoadAgent("127.0.0.1", port, "http://127.0.0.1:1/health/ready")
    agent.start()
    try:
        agent.observe(200, {"status": "ready", "weight": 40})

        def line() -> str:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                return sock.makefile().read()

        assert line() == "ready 40%\n"
        # Its poller finds nothing on port 1 (no answer): the weight it had stands.
        wait_for(lambda: agent._state == "unknown", "the poller's first try", 10)
        assert line() == "ready 40%\n"
        # A second agent (an updating master's) may bind the same port.
        twin = LoadAgent("127.0.0.1", port, "http://127.0.0.1:1/health/ready")
        twin.start()
        twin.close()
    finally:
        agent.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_local_url_reaches_a_wildcard_bind_on_loopback():
    assert local_url("0.0.0.0", 5, "/x") == "http://127.0.0.1:5/x"
    assert local_url("::", 5, "/x") == "http://[::1]:5/x"
    assert local_url("10.1.2.3", 5, "/x") == "http://10.1.2.3:5/x"


# --- configuration --------------------------------------------------------------------------

def test_the_new_keys_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="agent_port"):
        config(tmp_path, agent_port=70000)
    with pytest.raises(ConfigError, match="agent_port must differ"):
        config(tmp_path, port=12000, agent_port=12000)
    with pytest.raises(ConfigError, match="cluster_hash_balance_factor"):
        config(tmp_path, cluster_hash_balance_factor=100)
    assert config(tmp_path, instance_name="auto", port=12000).instance_name == \
        f"{socket.gethostname()}:12000"
    cfg = config(tmp_path, port=12000)
    assert cfg.drain_path == tmp_path / "logs" / "drain-12000" and not cfg.draining()


# --- the routes -----------------------------------------------------------------------------

def test_liveness_readiness_and_draining(app, client, tmp_path):
    svc = app.extensions["ollama_server"]
    assert client.get("/health/live").status_code == 200
    ready = client.get("/health/ready")
    assert ready.status_code == 200, ready.json
    assert ready.json["status"] == "ready" and ready.json["weight"] == 100
    assert "X-Served-By" not in ready.headers  # no instance_name: no header
    svc.config.drain_path.parent.mkdir(parents=True, exist_ok=True)
    svc.config.drain_path.touch()
    for path in ("/health/ready", "/health"):
        resp = client.get(path)
        assert resp.status_code == 503 and resp.json["status"] == "draining", resp.json
    assert client.get("/health/live").status_code == 200  # alive while it drains
    svc.config.drain_path.unlink()
    assert client.get("/health/ready").status_code == 200


def test_the_weight_follows_the_slots(app, client):
    svc = app.extensions["ollama_server"]
    queue = svc.manager.queue
    parallel = svc.manager.parallel_for("tiny:latest")
    for _ in range(parallel // 2):
        queue.enter("tiny:latest", parallel, 8, timeout=1)
    body = client.get("/health/ready").json
    assert body["slots_total"] == parallel and body["slots_busy"] == parallel // 2
    assert body["weight"] == round(100 * (parallel - parallel // 2) / parallel)


def test_every_answer_names_the_instance(app, client):
    app.extensions["ollama_server"].config.instance_name = "inst7"
    for path in ("/health/ready", "/api/tags", "/no/such/route"):
        assert client.get(path).headers["X-Served-By"] == "inst7"

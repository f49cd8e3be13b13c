"""The scale-out deployment (issue 21) as files: ``./install-user-service.sh --instances N``
(the llm-inference@ template, the balancer unit, each instance's environment file and the
balancer's HAProxy configuration, all from cluster.plan and render_haproxy), its uninstall,
and docker-compose.scale.yml with container/haproxy.scale.cfg kept in step with
render_haproxy. No service runs here: the units are checked by ``systemd-analyze verify``, the
HAProxy configurations by ``haproxy -c`` (Debian's HAProxy 2.6, `make haproxy`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ollama_server.cluster import instance_env, plan, render_haproxy, run_dir
from ollama_server.config import load_config, read_env_file
from tests.helpers import ROOT

UNIT = "llm-inference"
BALANCER = "llm-inference-balancer"
PORT = 18600
COMPOSE = ROOT / "docker-compose.scale.yml"
STATIC_CFG = ROOT / "container" / "haproxy.scale.cfg"
HAPROXY_CONTAINERFILE = ROOT / "container" / "Containerfile.haproxy"


def haproxy() -> str:
    found = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.access(found, os.X_OK):
        pytest.fail("haproxy is missing: run `make haproxy` (make test does)")
    return found


def haproxy_check(path: Path) -> None:
    out = subprocess.run([haproxy(), "-c", "-f", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def sections(text: str) -> dict[str, list[str]]:
    """An HAProxy configuration's sections ("defaults", "frontend llm", ...) and their lines,
    comments and blank lines left out."""
    out: dict[str, list[str]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not raw[0].isspace():
            current = line
            out[current] = []
        else:
            assert current is not None, raw
            out[current].append(line)
    return out


def servers(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith(("server ", "server-template "))]


def others(lines: list[str]) -> list[str]:
    return [line for line in lines if line not in servers(lines)]


# --- docker-compose.scale.yml and container/haproxy.scale.cfg ----------------------------------

def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def replica_config():
    """The replicas' configuration: the image's file with the compose file's environment."""
    environ = {k: str(v) for k, v in compose()["services"]["llm-inference"]["environment"]
               .items()}
    return load_config(ROOT / "container" / "service_config.yaml", environ=environ)


def template_options(line: str) -> tuple[str, int, str, list[str]]:
    """``server-template NAME 1-N HOST:PORT OPTIONS`` as (name, N, host:port, options)."""
    _, name, span, address, *options = line.split()
    first, last = span.split("-")
    assert first == "1"
    return name, int(last), address, options


def test_static_haproxy_config_is_render_haproxys_with_dns_servers():
    config = replica_config()
    static = sections(STATIC_CFG.read_text())
    count = template_options(servers(static["backend by_load"])[0])[1]
    rendered = sections(render_haproxy(config, plan(config, count)))
    # The same global settings (maxconn for `count` servers), timeouts, retries, error pages,
    # frontend and routing.
    for name in ("global", "defaults", "frontend llm"):
        assert static[name] == rendered[name], (
            f"{name} of {STATIC_CFG.name} is not render_haproxy's: copy it as its header says")
    assert others(static["backend by_load"]) == others(rendered["backend by_load"])
    # by_model: the rendered lines, then by_load's checks (a template cannot `track`).
    checks = others(rendered["backend by_load"])[1:]
    assert others(static["backend by_model"]) == others(rendered["backend by_model"]) + checks
    # Every server: the rendered options of by_load's (the replicas' agent port), resolved.
    want = servers(rendered["backend by_load"])[0].split()[3:]
    want[want.index("agent-port") + 1] = str(config.agent_port)
    for backend in ("backend by_load", "backend by_model"):
        (line,) = servers(static[backend])
        name, n, address, options = template_options(line)
        assert (name, n, address) == ("inst", count, f"llm-inference:{config.port}")
        assert options[:len(want)] == want
        assert options[len(want):] == ["resolvers", "compose", "resolve-prefer", "ipv4",
                                       "init-addr", "none"]
    # by_model's rendered servers differ only by `track` from by_load's maxconn.
    assert servers(rendered["backend by_model"])[0].split()[-2:] == want[1:3]
    assert static["resolvers compose"][0] == "parse-resolv-conf"


def test_haproxy_accepts_the_static_config():
    haproxy_check(STATIC_CFG)


def test_compose_scales_the_service_behind_haproxy():
    services = compose()["services"]
    assert set(services) == {"llm-inference", "haproxy"}
    app, lb = services["llm-inference"], services["haproxy"]
    # Replicas: any number, none with a fixed name or host port.
    assert str(app["deploy"]["replicas"]) in ("3", "${LLM_REPLICAS:-3}")
    assert "container_name" not in app and "ports" not in app
    env = app["environment"]
    assert env["OLLAMA_SERVER_INSTANCE_NAME"] == "auto"
    config = replica_config()
    assert config.agent_port == 11535 and config.port == 11435
    assert {str(config.port), str(config.agent_port)} <= {str(p) for p in app["expose"]}
    assert app["build"]["dockerfile"] == "Containerfile"
    # The balancer: the only published port, built here from the same base image.
    assert lb["ports"] == ["${LLM_PORT:-11435}:11435"]
    assert lb["depends_on"] == ["llm-inference"]
    assert lb["stop_signal"] == "SIGUSR1"
    assert (ROOT / lb["build"]["context"] / lb["build"]["dockerfile"]) == HAPROXY_CONTAINERFILE
    assert lb["build"]["args"]["BASE_IMAGE"] == app["build"]["args"]["BASE_IMAGE"]
    containerfile = HAPROXY_CONTAINERFILE.read_text()
    assert re.findall(r"^FROM (.+)$", containerfile, re.M) == ["${BASE_IMAGE}"]
    assert "apt-get install -y --no-install-recommends haproxy" in containerfile
    assert "COPY container/haproxy.scale.cfg /etc/haproxy/haproxy.cfg" in containerfile
    assert ('ENTRYPOINT ["/usr/sbin/haproxy", "-W", "-db", "-f", "/etc/haproxy/haproxy.cfg"]'
            in containerfile)


# --- ./install-user-service.sh --instances N ---------------------------------------------------

class Install:
    """./install-user-service.sh with XDG_CONFIG_HOME in a temporary folder, a store with two
    tiny models, a stand-in llama-server (never run) and a config file whose logs stay there."""

    def __init__(self, tmp_path: Path, store: Path) -> None:
        self.home = tmp_path / "cfg"
        self.conf = self.home / UNIT
        self.units = self.home / "systemd" / "user"
        self.engine = tmp_path / "engine"
        self.engine.mkdir()
        binary = self.engine / "llama-server"
        binary.write_text("#!/bin/sh\nexit 0\n")
        binary.chmod(0o755)
        self.config = tmp_path / "service.yaml"
        self.config.write_text(f"log_dir: {tmp_path / 'logs'}\n")
        self.store = store

    def env(self) -> dict[str, str]:
        """This process's environment without the service's settings, and XDG_CONFIG_HOME."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_SERVER_")}
        return {**env, "XDG_CONFIG_HOME": str(self.home)}

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        env = self.env()
        options = [] if "--uninstall" in args else [
            "--models", str(self.store), "--llama-cpp-dir", str(self.engine),
            "--config", str(self.config)]
        out = subprocess.run([str(ROOT / "install-user-service.sh"), *options, *args], env=env,
                             capture_output=True, text=True, timeout=180)
        if check:
            assert out.returncode == 0, out.stdout + out.stderr
        return out

    def service_config(self):
        """The configuration the balancer was rendered from (port: the balancer's)."""
        return load_config(self.config, environ={
            "OLLAMA_SERVER_ENV_FILE": str(self.conf / "environment")})

    def files(self) -> set[str]:
        return {str(p.relative_to(self.home)) for p in self.home.rglob("*") if not p.is_dir()}


@pytest.fixture
def install(tmp_path, tiny_store) -> Install:
    return Install(tmp_path, tiny_store)


def instance_units(count: int) -> list[str]:
    return [f"{UNIT}@{i}.service" for i in range(1, count + 1)]


def test_install_instances_writes_units_env_files_and_balancer(install):
    out = install("--port", str(PORT), "--instances", "3")
    assert f"for 3 instances on 127.0.0.1 ports {PORT + 1} {PORT + 2} {PORT + 3}" in out.stdout
    assert install.files() == {
        f"{UNIT}/environment", f"{UNIT}/install.env", f"{UNIT}/balancer.cfg",
        *(f"{UNIT}/instance-{i}.env" for i in (1, 2, 3)),
        f"systemd/user/{UNIT}@.service", f"systemd/user/{BALANCER}.service"}
    config = install.service_config()
    assert config.port == PORT
    cluster = plan(config, 3)
    # Each instance's file: its loopback address, and what `make cluster` gives the same
    # instance (so that `cluster update` drains the file the instance watches).
    for index, inst in enumerate(cluster, 1):
        env = read_env_file(install.conf / f"instance-{index}.env")
        assert env["OLLAMA_SERVER_PORT"] == str(PORT + index)
        assert env["OLLAMA_SERVER_AGENT_PORT"] == str(PORT + 100 + index)
        added = {k: v for k, v in instance_env(config, inst).items() if os.environ.get(k) != v}
        assert env == {"OLLAMA_SERVER_HOST": "127.0.0.1", "OLLAMA_SERVER_PORT": str(inst.port),
                       **added}
        assert env["OLLAMA_SERVER_DRAIN_FILE"] == str(inst.drain_file)
    # The balancer: render_haproxy's configuration of the same plan, which HAProxy accepts.
    cfg = install.conf / "balancer.cfg"
    assert cfg.read_text() == render_haproxy(config, cluster,
                                             stats_socket=run_dir(config) / "haproxy.sock")
    haproxy_check(cfg)
    assert "INSTANCES=3" in (install.conf / "install.env").read_text()

    template = (install.units / f"{UNIT}@.service").read_text()
    balancer = (install.units / f"{BALANCER}.service").read_text()
    for text in (template, balancer):  # every @NAME@ filled in
        assert not re.search(r"^[^#].*@[A-Z_]+@", text, re.M), text
    assert f"EnvironmentFile={install.conf}/instance-%i.env" in template
    assert f"Environment=OLLAMA_SERVER_ENV_FILE={install.conf}/environment" in template
    python = read_env_file(install.conf / "install.env")["PYTHON"]
    assert (f"ExecStart={python} -m ollama_server.main --config {install.config} "
            f"--host ${{OLLAMA_SERVER_HOST}} --port ${{OLLAMA_SERVER_PORT}}\n") in template
    assert "Type=notify\nNotifyAccess=all" in template
    assert "ExecReload=/bin/kill -HUP $MAINPID" in template
    assert f"Wants={' '.join(instance_units(3))}\n" in balancer
    assert f"After=network.target {' '.join(instance_units(3))}\n" in balancer
    assert f"ExecStart={haproxy()} -Ws -db -f {cfg}\n" in balancer
    assert "ExecReload=/bin/kill -USR2 $MAINPID" in balancer
    assert "KillSignal=SIGUSR1" in balancer


def test_rendered_units_pass_systemd_analyze_verify(install, tmp_path):
    install("--port", str(PORT), "--instances", "2")
    # A template is verified as one of its instances (a name with something after the @).
    verify_dir = tmp_path / "verify"
    verify_dir.mkdir()
    for name in (f"{UNIT}@.service", f"{BALANCER}.service"):
        shutil.copy(install.units / name, verify_dir / name)
    (verify_dir / f"{UNIT}@2.service").symlink_to(f"{UNIT}@.service")
    out = subprocess.run(["systemd-analyze", "verify", str(verify_dir / f"{UNIT}@2.service"),
                          str(verify_dir / f"{BALANCER}.service")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and UNIT not in out.stderr, out.stderr


def test_uninstall_removes_the_balancer_and_the_instances(install):
    install("--port", str(PORT), "--instances", "3")
    out = install("--uninstall")
    assert f"removed the {BALANCER} unit and the {UNIT}@ instances" in out.stdout
    # The settings stay; everything the install made of the instances goes.
    assert install.files() == {f"{UNIT}/environment"}


def test_instances_are_remembered_shrunk_and_given_up(install):
    install("--port", str(PORT), "--instances", "3")
    install("--instances", "2")
    assert not (install.conf / "instance-3.env").exists()
    balancer = (install.units / f"{BALANCER}.service").read_text()
    assert f"Wants={' '.join(instance_units(2))}\n" in balancer
    assert len(sections((install.conf / "balancer.cfg").read_text())["backend by_load"]) == 6
    # Without --instances: as installed before (a setting, like the port).
    install()
    assert "INSTANCES=2" in (install.conf / "install.env").read_text()
    assert (install.conf / "instance-2.env").exists()
    # --instances 0: the one unit of a plain install again, on the same port.
    out = install("--instances", "0")
    assert f"installed {install.units / UNIT}.service (port {PORT}" in out.stdout
    assert install.files() == {f"{UNIT}/environment", f"{UNIT}/install.env",
                               f"systemd/user/{UNIT}.service"}
    assert "INSTANCES" not in (install.conf / "install.env").read_text()
    install("--instances", "1")
    assert not (install.units / f"{UNIT}.service").exists()
    assert (install.conf / "instance-1.env").exists()


def test_shared_settings_may_not_set_what_each_instance_sets(install):
    install("--port", str(PORT))
    with open(install.conf / "environment", "a") as fh:
        fh.write("OLLAMA_SERVER_AGENT_PORT=9999\n")
    out = install("--instances", "2", check=False)
    assert out.returncode != 0
    assert "sets OLLAMA_SERVER_AGENT_PORT, which each instance sets for itself" in out.stderr
    assert not (install.units / f"{BALANCER}.service").exists()
    assert (install.units / f"{UNIT}.service").exists()


def test_status_and_update_name_the_instances(install):
    install("--port", str(PORT), "--instances", "2")
    env = install.env()
    status = subprocess.run([str(ROOT / "service-status-user.sh")], env=env,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0].startswith(f"{BALANCER}: ")
    assert lines[1] == (f"http://127.0.0.1:{PORT} (HAProxy): not answering ([Errno 111] "
                        f"Connection refused)")
    assert lines[2].startswith(f"{UNIT}@1: ") and lines[2].endswith(
        f"; port {PORT + 1}: not answering")
    assert lines[3].startswith(f"{UNIT}@2: ") and lines[3].endswith(
        f"; port {PORT + 2}: not answering")
    assert lines[4].startswith("errors in the journal, last hour: ")
    update = subprocess.run([str(ROOT / "update-service.sh")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert update.returncode == 1
    assert "update them with ./update-service.sh --all" in update.stderr
    # --all: the cluster's rolling update; an instance that does not answer is skipped.
    update = subprocess.run([str(ROOT / "update-service.sh"), "--all"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert update.returncode == 0, update.stderr
    assert update.stdout.splitlines() == [
        f"inst{i}: not serving on http://127.0.0.1:{PORT + i}; skipped" for i in (1, 2)]

"""The llm-inference user unit under a real systemd: PID 1 here is not systemd, so the test runs
one in a podman container (systemd as PID 1, a lingering user "svc"), installs the unit there
with ./install-user-service.sh from a copy of this checkout (the engine build and the models
mounted from the host), drives it with systemctl --user, ./service-status-user.sh,
./update-service.sh and journalctl --user, and calls the service from the host in between (the
container shares the host's network). Then the same with two instances behind HAProxy
(--instances 2: the units llm-inference@1, llm-inference@2 and llm-inference-balancer), called
through the balancer while ./update-service.sh --all updates them one at a time. Plus
`systemd-analyze verify` of the unit on the host."""

from __future__ import annotations

import os
import subprocess
import threading

import openai
import pytest
import requests

from tests.deploy import podman as pm
from tests.helpers import ROOT, cluster_port, free_port, wait_for

# Image builds on a cold cache take minutes (warm: seconds).
pytestmark = [pytest.mark.deploy, pytest.mark.timeout(1800)]

UNIT = "llm-inference"
MODEL = "smollm2:135m"


def test_unit_passes_systemd_analyze_verify(tmp_path, real_models, engine_binary):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path)}
    out = subprocess.run([str(ROOT / "install-user-service.sh"), "--models", str(real_models),
                          "--llama-cpp-dir", str(engine_binary.parent), "--port", "18080"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    unit = tmp_path / "systemd" / "user" / f"{UNIT}.service"
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    assert verify.returncode == 0 and UNIT not in verify.stderr, verify.stderr
    environment = (tmp_path / UNIT / "environment").read_text()
    assert "OLLAMA_SERVER_PORT=18080" in environment


class Machine:
    """A container running systemd, with the user ``svc`` and its user manager."""

    def __init__(self, name: str) -> None:
        self.name = name

    def root(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return pm.podman("exec", self.name, *cmd, check=check, timeout=600)

    def svc(self, command: str, check: bool = True) -> subprocess.CompletedProcess:
        """A shell command as ``svc`` in its checkout, with its user manager's environment."""
        return pm.podman("exec", "--user", "svc", "-e", "XDG_RUNTIME_DIR=/run/user/1000",
                         "-e", "DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/1000/bus",
                         "-w", "/home/svc/llm-inference", self.name, "bash", "-c", command,
                         check=check, timeout=600)

    def show(self, *props: str) -> dict[str, str]:
        out = self.svc(f"systemctl --user show {UNIT} " + " ".join(f"-p {p}" for p in props))
        return dict(line.split("=", 1) for line in out.stdout.splitlines())


@pytest.fixture(scope="module")
def machine(engine_binary, real_models):
    pm.build(pm.SYSTEMD_IMAGE, ROOT / "tests/container/Containerfile.systemd", ROOT)
    name = f"llm-inference-systemd-{os.getpid()}"
    # nofile: HAProxy (the balancer of the last test) needs about 2 descriptors per connection
    # of its global maxconn, more than containers.conf's 1024 (within this host's hard limit);
    # naming one limit drops containers.conf's others, hence nproc again.
    pm.podman("run", "-d", "--name", name, "--systemd=always", "--privileged",
              "--ulimit", "nofile=8192:8192", "--ulimit", "nproc=1024:1024",
              "--network", "host", "-v", f"{ROOT}:/src:ro",
              "-v", f"{engine_binary.parent}:/engine:ro", "-v", f"{real_models}:/models:ro",
              pm.SYSTEMD_IMAGE)
    box = Machine(name)
    try:
        wait_for(lambda: box.root("systemctl", "is-system-running", check=False).stdout.strip()
                 in ("running", "degraded"), "systemd to boot", 120)
        box.root("loginctl", "enable-linger", "svc")
        wait_for(lambda: box.root("systemctl", "is-active", "user@1000.service",
                                  check=False).stdout.strip() == "active",
                 "svc's user manager", 60)
        # The checkout as svc's own copy (no venv, models or git: those come from the host).
        box.svc("tar -C /src --exclude=./.venv --exclude=./models "
                "--exclude=./.git --exclude=./logs -cf - . | tar -C ~/llm-inference -xf -")
        yield box
    finally:
        pm.podman("rm", "-f", "-t", "5", name, check=False)


def test_user_unit_lifecycle_under_systemd(machine):
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    out = machine.svc(f"./install-user-service.sh --models /models --llama-cpp-dir /engine "
                      f"--port {port} --python /opt/venv/bin/python").stdout
    assert f"installed /home/svc/.config/systemd/user/{UNIT}.service" in out
    machine.svc(f"systemctl --user start {UNIT} && systemctl --user enable {UNIT}")
    pm.wait_healthy(base_url)
    oai = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=180)
    oai.chat.completions.create(model=MODEL, max_tokens=2,
                                messages=[{"role": "user", "content": "hi"}])

    status = machine.svc("./service-status-user.sh").stdout
    first_pid = machine.show("MainPID")["MainPID"]
    assert f"{UNIT}: active (running), pid {first_pid}" in status, status
    assert f"http://127.0.0.1:{port}: ok (HTTP 200)" in status
    assert f"{MODEL}: ready" in status and "on CPU" in status
    assert "errors in the journal, last hour: none" in status

    # reload: the environment file gains an API key; the same process applies it.
    machine.svc("echo OLLAMA_SERVER_API_KEY=k-7 >> ~/.config/llm-inference/environment && "
                f"systemctl --user reload {UNIT}")
    wait_for(lambda: requests.get(base_url + "/v1/models", timeout=5).status_code == 401,
             "the reload to require the key")
    keyed = {"Authorization": "Bearer k-7"}
    assert requests.get(base_url + "/v1/models", headers=keyed, timeout=5).status_code == 200
    assert machine.show("MainPID")["MainPID"] == first_pid

    # update without downtime: a new main process, the unit stays active throughout.
    out = machine.svc("./update-service.sh").stdout
    assert "update: done" in out, out
    after = machine.show("MainPID", "ActiveState", "SubState")
    assert after["MainPID"] != first_pid and after["ActiveState"] == "active"
    assert requests.get(base_url + "/v1/models", headers=keyed, timeout=5).status_code == 200

    # restart, then journalctl --user shows the service's own lines.
    machine.svc(f"systemctl --user restart {UNIT}")
    pm.wait_healthy(base_url)
    oai_keyed = openai.OpenAI(base_url=base_url + "/v1", api_key="k-7", max_retries=0,
                              timeout=180)
    oai_keyed.chat.completions.create(model=MODEL, max_tokens=2,
                                      messages=[{"role": "user", "content": "hi"}])
    journal = machine.svc(f"journalctl --user -u {UNIT} --no-pager -o cat").stdout
    assert f"serving on http://127.0.0.1:{port}" in journal
    assert "configuration reloaded" in journal and "update: the new master" in journal
    assert "SIGKILL" not in journal, "a stop had to kill processes"

    # stop: nothing of the service is left, and the stop was clean.
    machine.svc(f"systemctl --user stop {UNIT}")
    assert machine.show("ActiveState", "Result") == {"ActiveState": "inactive",
                                                      "Result": "success"}
    left = machine.root("pgrep", "-u", "svc", "-f", "llama-server|ollama_server", check=False)
    assert left.stdout.strip() == ""
    with pytest.raises(requests.ConnectionError):
        requests.get(base_url + "/health", timeout=5)

    machine.svc("./install-user-service.sh --uninstall")
    assert machine.svc(f"test -e ~/.config/systemd/user/{UNIT}.service",
                       check=False).returncode == 1


class Poller:
    """A client calling the balancer without a pause, in a thread: a listing, then a chat
    (routed by its model); every answer but a 200 is a failure."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.ok = 0
        self.failures: list[str] = []
        self.served_by: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        chat = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
        while not self._stop.is_set():
            for method, path, body in (("GET", "/v1/models", None),
                                       ("POST", "/v1/chat/completions", chat)):
                try:
                    resp = requests.request(method, self.base_url + path, json=body, timeout=180)
                except requests.RequestException as exc:
                    self.failures.append(f"{method} {path}: {exc}")
                    continue
                if resp.status_code == 200:
                    self.ok += 1
                    self.served_by.add(resp.headers.get("X-Served-By", "?"))
                else:
                    self.failures.append(f"{method} {path}: {resp.status_code} {resp.text[:200]}")

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=200)


def test_instances_behind_the_balancer_roll_over_under_systemd(machine):
    balancer, instances = f"{UNIT}-balancer", [f"{UNIT}@1", f"{UNIT}@2"]
    # Debian's HAProxy in the machine (tests/container/Containerfile.systemd has none); its own
    # system service is not wanted.
    if machine.root("test", "-x", "/usr/sbin/haproxy", check=False).returncode != 0:
        machine.root("sh", "-c", "apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive "
                     "apt-get install -y -q --no-install-recommends haproxy >/dev/null && "
                     "systemctl disable --now haproxy")
    port = cluster_port(2)
    base_url = f"http://127.0.0.1:{port}"
    machine.svc("rm -f ~/.config/llm-inference/environment")  # the last test's API key
    install = machine.svc(f"./install-user-service.sh --models /models --llama-cpp-dir /engine "
                          f"--port {port} --python /opt/venv/bin/python --instances 2 --start",
                          check=False)
    journal = machine.svc(f"journalctl --user -u {balancer} -u '{UNIT}@*' --no-pager -o cat "
                          f"-n 30", check=False).stdout
    assert install.returncode == 0, install.stdout + install.stderr + journal
    out = install.stdout
    assert f"installed /home/svc/.config/systemd/user/{balancer}.service" in out, out
    assert f"for 2 instances on 127.0.0.1 ports {port + 1} {port + 2}" in out
    pm.wait_healthy(base_url)
    oai = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=180)
    oai.chat.completions.create(model=MODEL, max_tokens=2,
                                messages=[{"role": "user", "content": "hi"}])
    # Both instances serve behind it (least connections over the listings).
    wait_for(lambda: {requests.get(base_url + "/v1/models", timeout=10).headers.get(
        "X-Served-By") for _ in range(6)} == {"inst1", "inst2"}, "both instances to serve", 60)

    status = machine.svc("./service-status-user.sh").stdout.splitlines()
    assert status[0].startswith(f"{balancer}: active (running), pid "), status
    assert status[1].startswith(f"{base_url} (HAProxy): ok (HTTP 200)"), status
    for i, unit in enumerate(instances, 1):
        assert status[1 + i].startswith(f"{unit}: active (running), pid "), status
        assert f"; port {port + i}: ok, " in status[1 + i], status

    def show(unit: str) -> dict[str, str]:
        out = machine.svc(f"systemctl --user show {unit} -p MainPID -p ActiveState -p Result")
        return dict(line.split("=", 1) for line in out.stdout.splitlines())

    before = {unit: show(unit)["MainPID"] for unit in instances}
    with Poller(base_url) as poller:
        out = machine.svc("./update-service.sh --all").stdout
    assert "inst1: updated and back in the balancer" in out, out
    assert "inst2: updated and back in the balancer" in out, out
    assert poller.failures == [], poller.failures
    print(f"\nrolling update of 2 instances: {poller.ok} answers through the balancer, none "
          f"failed")
    assert poller.ok > 10 and poller.served_by == {"inst1", "inst2"}, (poller.ok,
                                                                         poller.served_by)
    for unit in instances:  # a new main process each; the units stayed active throughout
        after = show(unit)
        assert after["MainPID"] != before[unit] and after["ActiveState"] == "active", after

    # stop: the balancer first (it is ordered after its instances), then each instance; clean.
    machine.svc(f"systemctl --user stop {balancer} {' '.join(instances)}")
    for unit in (balancer, *instances):
        assert show(unit)["ActiveState"] == "inactive" and show(unit)["Result"] == "success", \
            (unit, show(unit))
    left = machine.root("pgrep", "-u", "svc", "-f", "llama-server|ollama_server|haproxy",
                        check=False)
    assert left.stdout.strip() == ""
    journal = machine.svc(f"journalctl --user -u {balancer} -u '{UNIT}@*' --no-pager -o cat"
                          ).stdout
    assert "SIGKILL" not in journal, "a stop had to kill processes"

    machine.svc("./install-user-service.sh --uninstall")
    assert machine.svc("find ~/.config/systemd/user -name 'llm-inference*'").stdout == ""
    assert machine.svc("ls ~/.config/llm-inference").stdout.split() == ["environment"]

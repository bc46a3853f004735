"""Deployment files checked without a Docker engine: compose, CPU override, HAProxy, Prometheus, images.

What can run here does: the `server` service's exact command starts on a tiny bundle and answers its
own health check, every `nmt` flag the deployment uses exists in `nmt CMD --help`, and the demo reuses
finished stages and stops its server. `docker-compose config` and `promtool` validate the files when
those binaries are installed (skipped with the reason otherwise).
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from functools import cache
from importlib.metadata import requires
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
SERVER_SERVICES = ("server", "replica")
JOB_SERVICES = ("train", "export")


# --------------------------------------------------------------------------- loading and merging


class Reset:
    """Compose's `!reset` tag: the override removes the value instead of merging into it."""


class ComposeLoader(yaml.SafeLoader):
    pass


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())


def load_yaml(name: str) -> dict:
    return yaml.load((REPO / name).read_text(encoding="utf-8"), Loader=ComposeLoader)


def merge(base, override, key: str = ""):
    """Compose's merge rules, as far as our files use them: mappings merge, lists append, except
    command/entrypoint/healthcheck test which are replaced; `!reset` clears."""
    if isinstance(override, Reset):
        return type(base)() if base is not None else None
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = merge(base[k], v, k) if k in base else (None if isinstance(v, Reset) else v)
        return out
    if isinstance(base, list) and isinstance(override, list) and key not in ("command", "entrypoint", "test"):
        return base + override
    return override


def interpolate(value: str) -> str:
    """${VAR:-default} -> default: the values compose uses when the variable is unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


@cache
def compose() -> dict:
    return load_yaml("docker-compose.yml")


@cache
def compose_cpu() -> dict:
    return merge(compose(), load_yaml("docker-compose.cpu.yml"))


def flag(cmd: list[str], name: str) -> str:
    assert name in cmd, f"{name} missing from {cmd}"
    return interpolate(str(cmd[cmd.index(name) + 1]))


def service_cmd(config: dict, service: str) -> list[str]:
    return [interpolate(str(a)) for a in config["services"][service]["command"]]


def mounts(service: dict) -> dict[str, tuple[str, str]]:
    """target -> (source, mode) of a service's short-syntax volumes."""
    out = {}
    for v in service.get("volumes", []):
        source, target, *mode = interpolate(v).split(":")
        out[target] = (source, mode[0] if mode else "rw")
    return out


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)([hms])", duration))


def gpu_devices(service: dict) -> list:
    reservations = ((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}
    return reservations.get("devices") or []


# --------------------------------------------------------------------------- compose structure


def test_services_and_profiles():
    services = compose()["services"]
    assert set(services) == {"server", "train", "export", "replica", "balancer", "prometheus"}
    assert "profiles" not in services["server"]  # `docker compose up` starts the server and nothing else
    for name in JOB_SERVICES:
        assert services[name]["profiles"] == ["jobs"]
        assert services[name]["restart"] == "no"
    for name in ("replica", "balancer", "prometheus"):
        assert services[name]["profiles"] == ["scale"]
    assert services["replica"]["deploy"]["replicas"] >= 2
    assert "ports" not in services["replica"]  # replicas are reached through the balancer only


@pytest.mark.parametrize("name", SERVER_SERVICES + JOB_SERVICES)
def test_gpu_reserved(name):
    [device] = gpu_devices(compose()["services"][name])
    assert device["driver"] == "nvidia" and device["count"] >= 1 and "gpu" in device["capabilities"]


def test_jobs_and_servers_share_volumes():
    services = compose()["services"]
    train, export = service_cmd(compose(), "train"), service_cmd(compose(), "export")
    assert train[:2] == ["nmt", "train"] and export[:2] == ["nmt", "export"]
    run_dir, checkpoint, bundle = flag(train, "--out"), Path(export[2]), flag(export, "--out")
    assert checkpoint.parent == Path(run_dir) and checkpoint.name == "final.pt"
    for job in JOB_SERVICES:
        m = mounts(services[job])
        assert m["/runs"] == ("runs", "rw") and m["/bundles"] == ("bundles", "rw") and m["/data"][0] == "data"
    for name in SERVER_SERVICES:
        model_dir = flag(service_cmd(compose(), name), "--model-dir")
        assert model_dir == bundle  # the server serves what the export job writes ...
        assert mounts(services[name])["/bundles"] == ("bundles", "ro")  # ... read-only
    declared = set(compose()["volumes"])
    used = {src for s in services.values() for src, _ in mounts(s).values() if not src.startswith(".")}
    assert used <= declared


@pytest.mark.parametrize("name", SERVER_SERVICES)
def test_server_ports_healthcheck_and_drain(name):
    svc = compose()["services"][name]
    cmd = service_cmd(compose(), name)
    port, metrics, http = flag(cmd, "--port"), flag(cmd, "--metrics-port"), flag(cmd, "--http-port")
    assert {port, metrics, http} <= set(svc["expose"])
    assert svc["healthcheck"]["test"] == ["CMD", "nmt", "health", "--server", f"localhost:{port}"]
    assert flag(cmd, "--host") == "0.0.0.0"  # reachable from other containers
    assert svc["restart"] == "unless-stopped" and svc["stop_signal"] == "SIGTERM"
    drain = float(flag(cmd, "--drain-seconds"))
    # Compose must let the drain finish before SIGKILL, without waiting much longer than it.
    assert drain < seconds(svc["stop_grace_period"]) <= drain + 30
    if name == "server":
        assert {p.split(":")[1].split()[0] for p in svc["ports"]} == {port, metrics, http}


def test_cpu_override_drops_gpu_and_changes_only_the_device():
    gpu, cpu = compose(), compose_cpu()
    for name in SERVER_SERVICES + JOB_SERVICES:
        assert gpu_devices(cpu["services"][name]) == [], name
    for name in SERVER_SERVICES:
        g, c = service_cmd(gpu, name), service_cmd(cpu, name)
        assert flag(g, "--device") == "cuda" and flag(c, "--device") == "cpu"
        i = g.index("--device") + 1
        assert c[:i] + c[i + 1:] == g[:i] + g[i + 1:]
    replicas = [c["services"]["replica"]["deploy"]["replicas"] for c in (gpu, cpu)]
    assert replicas[0] == replicas[1]
    for name in JOB_SERVICES:
        assert service_cmd(cpu, name)[:3] == service_cmd(gpu, name)[:3]


# --------------------------------------------------------------------------- `nmt` flags used exist


def deployment_commands() -> list[list[str]]:
    cmds = []
    for config in (compose(), compose_cpu()):
        for name, svc in config["services"].items():
            if str(svc.get("command", [""])[0]) == "nmt":
                cmds.append(service_cmd(config, name))
            test = svc.get("healthcheck", {}).get("test", [])
            if test[1:2] == ["nmt"]:
                cmds.append(test[1:])
    for dockerfile in ("serve", "train"):
        for instruction in ("HEALTHCHECK", "CMD"):
            cmds.append(dockerfile_exec(dockerfile, instruction))
    return cmds


def dockerfile_text(name: str) -> str:
    return (REPO / "docker" / f"{name}.Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")


def dockerfile_exec(name: str, instruction: str) -> list[str]:
    """The exec-form (JSON) command of a Dockerfile's last HEALTHCHECK or CMD."""
    pattern = r"^HEALTHCHECK\b.*?\bCMD\s+(\[.*\])" if instruction == "HEALTHCHECK" else r"^CMD\s+(\[.*\])"
    matches = re.findall(pattern, dockerfile_text(name), flags=re.M)
    assert matches, f"{name}.Dockerfile has no exec-form {instruction}"
    return yaml.safe_load(matches[-1])


@cache
def nmt_help(sub: str) -> str:
    r = subprocess.run([sys.executable, "-m", "nmt", sub, "--help"], capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0 and "No module named" in r.stderr:
        pytest.skip(f"`nmt {sub}` is not implemented yet: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("sub", ["serve", "health", "train", "export"])
def test_every_flag_used_exists(sub):
    used = [c for c in deployment_commands() if c[0] == "nmt" and c[1:2] == [sub]]
    assert used, f"the deployment never runs `nmt {sub}`"
    help_text = nmt_help(sub)
    for cmd in used:
        for arg in cmd[2:]:
            if arg.startswith("--"):
                assert re.search(rf"(^|\s){re.escape(arg)}\b", help_text), f"`nmt {sub}` has no {arg}: {cmd}"


# --------------------------------------------------------------------------- external validators


def compose_binary() -> tuple[list[str], bool] | None:
    """(command, reads `!reset`): Compose v2 (plugin or standalone) reads it, 1.x does not."""
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if not shutil.which(cmd[0]):
            continue
        r = subprocess.run(cmd + ["version"], capture_output=True, text=True)
        m = re.search(r"(\d+)\.\d+\.\d+", r.stdout)
        if r.returncode == 0 and m:
            return cmd, int(m[1]) >= 2
    return None


def test_docker_compose_config_validates(tmp_path):
    found = compose_binary()
    if found is None:
        pytest.skip("no docker compose / docker-compose binary (Debian: apt-get install docker-compose)")
    cmd, reads_reset = found
    base = cmd + ["--project-directory", str(REPO), "-f", str(REPO / "docker-compose.yml")]
    profiles = ["--profile", "jobs", "--profile", "scale"]
    r = subprocess.run(base + profiles + ["config", "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    override = REPO / "docker-compose.cpu.yml"
    if not reads_reset:  # Compose 1.x: check the override's keys and merge with the tag removed
        stripped = tmp_path / "docker-compose.cpu.yml"
        stripped.write_text(override.read_text(encoding="utf-8").replace("!reset ", ""), encoding="utf-8")
        override = stripped
    r = subprocess.run(base + ["-f", str(override)] + profiles + ["config"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if reads_reset:
        assert "nvidia" not in r.stdout


def haproxy_sections() -> dict[str, list[str]]:
    """deploy/haproxy.cfg as {"backend nmt_servers": [directive lines], ...}, comments dropped."""
    sections: dict[str, list[str]] = {}
    current = ""
    for line in (REPO / "deploy/haproxy.cfg").read_text(encoding="utf-8").splitlines():
        text = line.split("#", 1)[0].rstrip() if not line.lstrip().startswith("http-error") else line.rstrip()
        if not text.strip():
            continue
        if not text[0].isspace():
            current = text.strip()
            sections[current] = []
        else:
            sections[current].append(text.strip())
    return sections


def test_haproxy_balances_grpc_over_the_servers_with_health_checks():
    """The balancer service runs deploy/haproxy.cfg (the file the drill runs); HTTP/2 both sides, the gRPC
    health check, retries of dropped calls, UNAVAILABLE for its own errors, the servers on their --port."""
    svc = compose()["services"]["balancer"]
    config_path = svc["command"][svc["command"].index("-f") + 1]
    assert mounts(svc)[config_path] == ("./deploy/haproxy.cfg", "ro")
    published = {p.split(":")[1] for p in svc["ports"]}
    cfg = haproxy_sections()
    binds = {sec: [d.split()[1] for d in lines if d.startswith("bind ")] for sec, lines in cfg.items()}
    assert binds["frontend grpc"] == [":8080"] and "proto h2" in " ".join(cfg["frontend grpc"])
    assert {b.lstrip(":") for b in binds["frontend grpc"] + binds["frontend metrics"]} <= published
    backend = cfg["backend nmt_servers"]
    assert any(d.startswith("default-server proto h2 check") for d in backend)
    assert "tcp-check send-binary 0000050001000000010000000000" in backend  # an empty HealthCheckRequest
    assert "tcp-check expect binary 00000000020801" in backend  # status SERVING
    headers = backend[backend.index("tcp-check send-binary 000000040000000000") + 1]
    request = bytes.fromhex(headers.split()[-1])
    assert b"/grpc.health.v1.Health/Check" in request and b"application/grpc" in request
    defaults = cfg["defaults"]
    assert "mode http" in defaults and "retry-on conn-failure empty-response" in defaults
    assert all(any(d.startswith(f"http-error status {c} hdr grpc-status 14") for d in defaults)
               for c in (502, 503, 504))
    servers = [d.split() for d in backend if d.startswith(("server ", "server-template "))]
    addresses = {(w[2] if w[0] == "server" else w[3]).split(":")[0]: w for w in servers}
    assert set(addresses) == set(SERVER_SERVICES)
    for host, words in addresses.items():
        port = (words[2] if words[0] == "server" else words[3]).split(":")[1]
        assert port == flag(service_cmd(compose(), host), "--port")
        assert "resolvers" in words  # Docker's DNS: one address per container, re-resolved
    if shutil.which("haproxy"):
        r = subprocess.run(["haproxy", "-c", "-f", str(REPO / "deploy/haproxy.cfg")], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_scrapes_every_server_metrics_port():
    prom = load_yaml("deploy/prometheus.yml")
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    [sd] = jobs["nmt-server"]["dns_sd_configs"]
    assert set(sd["names"]) == set(SERVER_SERVICES)
    for name in SERVER_SERVICES:
        assert str(sd["port"]) == flag(service_cmd(compose(), name), "--metrics-port")
    [metrics_bind] = [d.split()[1] for d in haproxy_sections()["frontend metrics"] if d.startswith("bind ")]
    assert jobs["balancer"]["static_configs"][0]["targets"] == [f"balancer{metrics_bind}"]
    svc = compose()["services"]["prometheus"]
    assert mounts(svc)["/etc/prometheus/prometheus.yml"] == ("./deploy/prometheus.yml", "ro")
    if shutil.which("promtool"):
        r = subprocess.run(["promtool", "check", "config", str(REPO / "deploy/prometheus.yml")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------- images


def pinned(text: str) -> dict[str, str]:
    return {re.sub(r"\[.*\]", "", n).lower().replace("_", "-"): v
            for n, v in re.findall(r"^([A-Za-z0-9_.\-\[\],]+)==(\S+)$", text, flags=re.M)}


def test_images_pin_the_tested_versions_and_serving_has_no_torch():
    serve, train = dockerfile_text("serve"), dockerfile_text("train")
    reqs = [Requirement(r) for r in requires("nmt-transformer") or []]  # pyproject.toml's, as installed
    serve_pins = pinned(serve)
    for req in reqs:  # every serving dependency pinned exactly, within the project's own bounds
        if req.marker is None:
            assert req.name in serve_pins and req.specifier.contains(serve_pins[req.name]), req
    assert "torch" not in serve_pins and "pip install --no-deps ." in serve
    assert "! pip show torch" in serve  # the build fails if anything pulled torch in
    assert "onnxruntime-gpu[cuda,cudnn]==" in serve  # CUDA and cuDNN libraries for the CUDA provider
    [torch_req] = [r for r in reqs if r.name == "torch"]
    assert f"ARG TORCH_VERSION={str(torch_req.specifier).removeprefix('==')}" in train
    for text in (serve, train):
        assert re.search(r"^USER nmt$", text, flags=re.M) and "useradd" in text
        assert re.search(r"^FROM \$\{PYTHON_IMAGE\}", text, flags=re.M)
        assert re.search(r"^ARG PYTHON_IMAGE=python:\d+\.\d+\.\d+-slim", text, flags=re.M)  # pinned patch
    cmd = dockerfile_exec("serve", "CMD")
    health = ["nmt", "health", "--server", f"localhost:{flag(cmd, '--port')}"]
    assert dockerfile_exec("serve", "HEALTHCHECK") == health
    assert f"EXPOSE {flag(cmd, '--port')} {flag(cmd, '--metrics-port')}" in serve


# --------------------------------------------------------------------------- it really runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local(cmd: list[str]) -> list[str]:
    """A container command as a local process: `nmt` of this environment."""
    assert cmd[0] == "nmt"
    return [sys.executable, "-m", "nmt"] + cmd[1:]


def test_server_service_command_starts_and_answers_its_health_check(tiny_bundle):
    nmt_help("serve")
    svc = compose_cpu()["services"]["server"]  # the CPU variant: no GPU here
    cmd = service_cmd(compose_cpu(), "server")
    port, metrics = str(free_port()), str(free_port())
    model_dir = flag(cmd, "--model-dir")
    mapping = {model_dir: str(tiny_bundle), flag(cmd, "--port"): port, flag(cmd, "--metrics-port"): metrics,
               "0.0.0.0": "127.0.0.1"}
    proc = subprocess.Popen(local([mapping.get(a, a) for a in cmd]), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    health = local([a.replace(f":{flag(cmd, '--port')}", f":{port}") for a in svc["healthcheck"]["test"][1:]])
    try:
        deadline = time.monotonic() + seconds(svc["healthcheck"]["start_period"])
        while subprocess.run(health, cwd=REPO, capture_output=True).returncode != 0:
            assert proc.poll() is None, f"server exited with {proc.returncode}: {proc.stdout.read()}"
            assert time.monotonic() < deadline, "no SERVING within the healthcheck's start_period"
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)  # what `docker compose stop` sends
        assert proc.wait(timeout=seconds(svc["stop_grace_period"])) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert subprocess.run(health, cwd=REPO, capture_output=True).returncode != 0  # gone after the stop


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_demo_reuses_finished_stages_serves_and_stops(tiny_checkpoint, tiny_bundle, tmp_path):
    nmt_help("serve")
    work = tmp_path / "demo"
    (work / "run").mkdir(parents=True)
    shutil.copy(tiny_checkpoint, work / "run" / "final.pt")
    (work / "run" / "demo-train.json").write_text('{"preset": "tiny", "minutes": 0.1, "max_steps": 150}')
    # Copied after the checkpoint and with fresh times: the export is current.
    shutil.copytree(tiny_bundle, work / "bundle", copy_function=shutil.copy)
    r = run_demo("--work-dir", str(work), "--skip-evaluate", "--test-lines", "12", "--beam", "2",
                 "--device", "cpu", "--drain-seconds", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "<== train: reused" in r.stdout and "<== export: reused" in r.stdout
    assert "the server drained and exited with code 0" in r.stdout
    hyps = (work / "test.hyp.de").read_text(encoding="utf-8").splitlines()
    assert len(hyps) == 12 and all(hyps)
    assert re.search(r"test set \(gRPC\): .*BLEU", r.stdout)


def test_demo_failing_stage_is_one_clear_line_and_nonzero(tmp_path):
    r = run_demo("--work-dir", str(tmp_path / "demo"), "--data-dir", str(tmp_path / "missing"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("demo: stage 'data' failed:")
    assert "Traceback" not in r.stderr

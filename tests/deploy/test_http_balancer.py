"""The HTTP API behind the shipped deploy/haproxy.cfg: real HAProxy, two real `nmt serve --http-port`
replicas. Requests are balanced over both; with one SIGKILLed every request still succeeds (retried
on the other before the health check marks it down, then not sent there at all); with none left
HAProxy answers in LibreTranslate's error shape.
"""

from __future__ import annotations

import http.cookiejar
import json
import re
import shutil
import signal
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from bench.drill_cluster import Balancer, Replica, free_port

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="no haproxy binary (Debian: apt-get install haproxy)")
TEXTS = ["A man is riding a bike.", "Two dogs play in the snow.", "A girl in a red dress."]


def post(url: str, fields: dict, opener=None, timeout: float = 30) -> tuple[int, dict]:
    data = json.dumps(fields).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with (opener or urllib.request.build_opener()).open(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def server_states(balancer: Balancer) -> dict[str, dict[str, float]]:
    """HAProxy's own view of the nmt_http backend, from its Prometheus exporter: per server, its
    state (1 = UP) and the HTTP 2xx answers it gave."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{balancer.metrics_port}/metrics", timeout=5).read()
    except OSError:  # HAProxy still starting
        return {}
    out: dict[str, dict[str, float]] = {}
    for m in re.finditer(r'^haproxy_server_(status|http_responses_total)\{([^}]*)\} (\S+)$', text.decode(),
                         re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if labels.get("proxy") != "nmt_http":
            continue
        key = {"status": f"state_{labels.get('state')}", "http_responses_total": f"code_{labels.get('code')}"}
        out.setdefault(labels["server"], {})[key[m.group(1)]] = float(m.group(3))
    return out


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_translate_through_the_balancer_survives_a_killed_replica(tiny_bundle, tmp_path):
    replicas = [Replica(f"h{i}", tiny_bundle, free_port(), 2.0, tmp_path, http_port=free_port())
                for i in (1, 2)]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda r: r.start(), replicas))
    balancer = Balancer([(r.name, r.port) for r in replicas], tmp_path,
                        http_servers=[(r.name, r.http_port) for r in replicas])
    url = f"http://127.0.0.1:{balancer.http_port}"
    try:
        wait_for(lambda: all(s.get("state_UP") == 1 for s in server_states(balancer).values())
                 and len(server_states(balancer)) == 2, 30, "both replicas UP in HAProxy")
        direct = post(f"http://127.0.0.1:{replicas[0].http_port}/translate",
                      {"q": TEXTS, "source": "en", "target": "de"})
        assert direct[0] == 200 and len(direct[1]["translatedText"]) == 3
        for _ in range(6):
            assert post(url + "/translate", {"q": TEXTS, "source": "en", "target": "de"}) == direct
        served = server_states(balancer)
        assert all(served[r.name]["code_2xx"] > 0 for r in replicas), served  # both did work

        # A stored file is downloaded from the replica that translated it: the cookie leads back there.
        jar = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        body, boundary = multipart({"source": "en", "target": "de"}, "a.txt", TEXTS[0]), "nmtboundary"
        req = urllib.request.Request(url + "/translate_file", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with jar.open(req, timeout=30) as r:
            file_url = json.loads(r.read())["translatedFileUrl"]
        assert urllib.parse.urlsplit(file_url).port == balancer.http_port
        for _ in range(4):
            with jar.open(file_url, timeout=30) as r:
                assert r.read().decode().strip() == direct[1]["translatedText"][0]

        replicas[1].proc.send_signal(signal.SIGKILL)
        replicas[1].proc.wait()
        # Before the health check notices: requests sent to the dead replica are retried on the live one.
        for _ in range(6):
            assert post(url + "/translate", {"q": TEXTS, "source": "en", "target": "de"}) == direct
        wait_for(lambda: server_states(balancer)[replicas[1].name].get("state_DOWN") == 1, 10,
                 "the killed replica marked DOWN")
        for _ in range(6):
            assert post(url + "/translate", {"q": TEXTS, "source": "en", "target": "de"}) == direct

        replicas[0].proc.send_signal(signal.SIGKILL)
        replicas[0].proc.wait()
        wait_for(lambda: server_states(balancer)[replicas[0].name].get("state_DOWN") == 1, 10,
                 "the last replica marked DOWN")
        assert post(url + "/translate", {"q": TEXTS[0], "source": "en", "target": "de"}) == (
            503, {"error": "no server available"})
    finally:
        balancer.stop()
        for r in replicas:
            r.stop()


def multipart(fields: dict[str, str], filename: str, content: str, boundary: str = "nmtboundary") -> bytes:
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                 f"Content-Type: text/plain\r\n\r\n{content}\r\n--{boundary}--\r\n")
    return "".join(parts).encode()

"""/health/ while 12 clients send request bodies one byte a second: gunicorn alone, and behind
deploy/nginx.conf (docker-compose.yml's proxy). Also plotly.min.js's bytes and cache lifetime.

    .venv/bin/python benchmarks/slow_bodies.py [--connections 12] [--wait 10] [--json]

Needs the `nginx` binary (Debian: apt-get install nginx-light). Starts gunicorn as bin/serve
does (2 workers × 4 threads) on a free local port, with a throwaway var dir whose static files
are collected as bin/serve collects them, and nginx with deploy/nginx.conf, only its ports and
paths made local. For each side: N connections POST /api/v1/auth/token/ (a view that reads
its body without a login) declaring 4096 bytes and send one a second; once they are all
sending, GET /health/ is timed 5 times, each given --wait seconds. gunicorn alone has 8
threads for N bodies: /health/ waits for a thread that never frees. Behind nginx, gunicorn
sees a request only once nginx holds its whole body. Goal (issue 16): under 1 s behind nginx.
"""

import argparse
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BODY_BYTES = 4096
# As bin/serve starts it; --preload as well, so that no /health/ times a worker's first import
# of Django (each worker would load the app at its first request otherwise).
GUNICORN = ["--workers", "2", "--threads", "4", "--timeout", "120", "--preload"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, what: str) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{what} is not listening on {port}")


def local_nginx_conf(work: Path, web_port: int, proxy_port: int, static_root: Path) -> Path:
    """deploy/nginx.conf made local by deploy/local_nginx.py, as `PEFTLAB_PROXY=nginx` does."""
    command = [
        sys.executable, str(DEPLOY / "local_nginx.py"),
        "--listen", f"127.0.0.1:{proxy_port}", "--upstream", f"127.0.0.1:{web_port}",
        "--static", str(static_root), "--work", str(work),
    ]  # fmt: skip
    written = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    path = Path(written.strip())
    path.write_text(path.read_text().replace("access_log /dev/stdout;", "access_log off;"))
    return path


def start_servers(work: Path) -> tuple[dict[str, int], list[subprocess.Popen]]:
    env = os.environ | {"PEFTLAB_VAR_DIR": str(work / "var"), "PEFTLAB_STATIC_COLLECTED": "1"}
    env["PEFTLAB_BEHIND_PROXY"] = "1"
    env.pop("DATABASE_URL", None)  # a throwaway SQLite file, migrated: no rows are needed
    manage = [sys.executable, str(ROOT / "manage.py")]
    subprocess.run([*manage, "migrate", "--noinput", "-v", "0"], env=env, check=True)
    subprocess.run([*manage, "collectstatic", "--noinput", "-v", "0"], env=env, check=True)
    ports = {"gunicorn": free_port(), "nginx": free_port()}
    web = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "webapp.wsgi", "--bind",
         f"127.0.0.1:{ports['gunicorn']}", *GUNICORN],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    conf = local_nginx_conf(work, ports["gunicorn"], ports["nginx"], work / "var" / "static")
    proxy = subprocess.Popen(
        ["nginx", "-c", str(conf), "-p", str(work), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL, stderr=open(work / "nginx.err", "wb"),
    )  # fmt: skip
    servers = [web, proxy]
    try:
        wait_listening(ports["gunicorn"], web, "gunicorn")
        wait_listening(ports["nginx"], proxy, "nginx (see nginx.err)")
    except BaseException:
        stop(servers)
        raise
    return ports, servers


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


class SlowBodies:
    """N connections that each send a POST's headers, then its body one byte a second."""

    def __init__(self, port: int, count: int):
        self.sockets = []
        head = (
            "POST /api/v1/auth/token/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {BODY_BYTES}\r\n\r\n"
        )
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(head.encode())
            self.sockets.append(sock)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self) -> None:
        while not self.stopping.wait(1.0):
            for sock in self.sockets:
                try:
                    sock.sendall(b" ")
                except OSError:
                    pass  # the server gave up on it: counted by still_open()

    def still_open(self) -> int:
        """Connections the server has neither answered nor closed."""
        open_ = 0
        for sock in self.sockets:
            sock.setblocking(False)
            try:
                sock.recv(1, socket.MSG_PEEK)  # an answer, or b"": closed
            except BlockingIOError:
                open_ += 1
            except OSError:
                pass
            sock.settimeout(5)
        return open_

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()
        for sock in self.sockets:
            sock.close()


def health_seconds(port: int, wait: float) -> float | None:
    """Seconds GET /health/ took, or None when it did not answer within `wait`."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=wait)
    try:
        conn.request("GET", "/health/")
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status
        return time.perf_counter() - start
    except TimeoutError:
        return None
    finally:
        conn.close()


def under_attack(port: int, connections: int, wait: float) -> dict:
    # Calm: the median of 6, once each worker has imported the URLconf at its first request.
    calm = statistics.median(health_seconds(port, wait) or wait for _ in range(6))
    attack = SlowBodies(port, connections)
    try:
        time.sleep(2.0)  # every connection handed to a thread (or held by nginx) and sending
        times = [health_seconds(port, wait) for _ in range(5)]
        held = attack.still_open()
    finally:
        attack.close()
    answered = [t for t in times if t is not None]
    return {
        "calm_s": calm,
        "answered": len(answered),
        "asked": len(times),
        "median_s": statistics.median(answered) if answered else None,
        "max_s": max(answered) if answered else None,
        "slow_bodies_still_open": held,
    }


def form_post_status(port: int) -> int:
    """A browser's form POST (POST /logout/ with the CSRF cookie, token and Origin header):
    302 when Django sees the Host the browser sent, port included; 403 when a proxy drops it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/login/")
    response = conn.getresponse()
    page = response.read().decode()
    cookie = response.getheader("Set-Cookie").split(";")[0]
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    headers = {
        "Cookie": cookie,
        "Origin": f"http://127.0.0.1:{port}",
        "Content-Type": "application/x-www-form-urlencoded",
    }
    conn.request("POST", "/logout/", body=f"csrfmiddlewaretoken={token}", headers=headers)
    status = conn.getresponse().status
    conn.close()
    return status


def static_figures(port: int, manifest_path: Path) -> dict:
    """plotly.js as a page links it: its URL, the bytes sent for a gzip client, Cache-Control."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/login/")
    page = conn.getresponse().read().decode()
    conn.close()
    # The login page links app.css; plotly.js's hashed name comes from the same manifest.
    manifest = json.loads(manifest_path.read_text())["paths"]
    url = "/static/" + manifest["plotly/plotly.min.js"]
    assert "/static/" + manifest["css/app.css"] in page, "pages do not link hashed names"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", url, headers={"Accept-Encoding": "gzip"})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return {
        "url": url,
        "status": response.status,
        "bytes_sent": len(body),
        "content_encoding": response.getheader("Content-Encoding"),
        "cache_control": response.getheader("Cache-Control"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=12)
    parser.add_argument("--wait", type=float, default=10.0, help="seconds each /health/ gets")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--side", choices=["both", "gunicorn", "nginx"], default="both", help="what to attack"
    )
    args = parser.parse_args()
    if shutil.which("nginx") is None:
        raise SystemExit("nginx is not installed (Debian: apt-get install nginx-light)")
    with tempfile.TemporaryDirectory(prefix="slow-bodies-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # nginx's workers (nobody) read the static files under it
        manifest = work / "var" / "static" / "staticfiles.json"
        ports, servers = start_servers(work)
        try:
            result = {
                side: under_attack(port, args.connections, args.wait)
                | {"static": static_figures(port, manifest), "form_post": form_post_status(port)}
                for side, port in ports.items()
                if args.side in ("both", side)
            }
        finally:
            stop(servers)
    result["connections"] = args.connections
    result["wait_s"] = args.wait
    if args.json:
        print(json.dumps(result))
        return
    report(result)


def seconds(value: float | None, wait: float) -> str:
    return f"no answer in {wait:.0f} s" if value is None else f"{value * 1000:.0f} ms"


def report(result: dict) -> None:
    wait = result["wait_s"]
    print(f"{result['connections']} connections sending a body at 1 byte/s; GET /health/ ×5:")
    sides = [side for side in ("gunicorn", "nginx") if side in result]
    for side in sides:
        figures = result[side]
        label = "gunicorn alone" if side == "gunicorn" else "nginx → gunicorn"
        print(
            f"  {label:17} calm {seconds(figures['calm_s'], wait)}; under attack "
            f"{figures['answered']}/{figures['asked']} answered, median "
            f"{seconds(figures['median_s'], wait)}, max {seconds(figures['max_s'], wait)} "
            f"({figures['slow_bodies_still_open']} slow bodies still open)"
        )
    print("plotly.min.js as a page links it, for a client that accepts gzip:")
    for side in sides:
        static = result[side]["static"]
        print(
            f"  {side:8} {static['bytes_sent'] / 1e6:.2f} MB sent, "
            f"Content-Encoding {static['content_encoding']}, "
            f"Cache-Control {static['cache_control']!r}"
        )


if __name__ == "__main__":
    main()

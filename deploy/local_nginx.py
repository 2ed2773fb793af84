"""deploy/nginx.conf for one machine without Docker: `PEFTLAB_PROXY=nginx make run` (bin/serve)
and benchmarks/slow_bodies.py run the system's nginx with what this writes.

    python deploy/local_nginx.py --listen 127.0.0.1:8000 --upstream 127.0.0.1:8001 \\
        --static var/static --work var/nginx

Prints the path of the file it wrote. Only compose's names change: the upstream, the listening
address, the paths of the include and of the static files, and the pid and temporary files,
which go under --work (writable without root). Everything that defends gunicorn stays as is.
"""

import argparse
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent
TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def render(*, listen: str, upstream: str, static: Path, work: Path) -> str:
    """nginx.conf's text with compose's service names and paths swapped for local ones."""
    conf = (DEPLOY / "nginx.conf").read_text()
    temp_paths = "".join(f"    {kind}_temp_path {work}/{kind};\n" for kind in TEMP_KINDS)
    swaps = {
        "server web:8000;": f"server {upstream};",
        "listen 80;": f"listen {listen};",
        "/etc/nginx/peftlab_proxy.conf": str(DEPLOY / "peftlab_proxy.conf"),
        "/srv/peftlab/static/": f"{static.resolve()}/",
        "pid /tmp/nginx.pid;": f"pid {work}/nginx.pid;",
        "http {": "http {\n" + temp_paths,
    }
    for compose_value, local_value in swaps.items():
        if compose_value not in conf:
            raise SystemExit(f"deploy/nginx.conf no longer has {compose_value!r}")
        conf = conf.replace(compose_value, local_value)
    return conf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="host:port nginx listens on")
    parser.add_argument("--upstream", required=True, help="host:port gunicorn listens on")
    parser.add_argument("--static", type=Path, required=True, help="STATIC_ROOT, collected")
    parser.add_argument("--work", type=Path, required=True, help="a folder of nginx's own")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    path = work / "nginx.conf"
    path.write_text(
        render(listen=args.listen, upstream=args.upstream, static=args.static, work=work)
    )
    print(path)


if __name__ == "__main__":
    main()

"""Legacy PHP apps as ops teams run them: Debian's nginx in front of Debian's php-fpm, with the
stock fastcgi.conf (which, like every stock nginx and Apache, sets REMOTE_USER from the client's
Basic credentials, unchecked). A tiny `whoami.php`, and an unmodified DokuWiki from Debian's
package in a private copy (its code, configuration and data in a temp dir, never the system's).

Each site runs its two servers as children in process groups of their own, on 127.0.0.1 only,
with every file (config, sockets, pid files, logs, the wiki's data) under the caller's temp dir.
A missing package fails the test with the package to install, never a silent skip.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from real_upstreams import send_raw

NGINX = "/usr/sbin/nginx"
# php-fpm8.2 on Debian 12; whichever version the distribution's php-fpm package brings.
PHP_FPM = next(iter(sorted(glob.glob("/usr/sbin/php-fpm[0-9]*"), reverse=True)),
               "/usr/sbin/php-fpm")
DOKUWIKI = Path("/usr/share/dokuwiki")
_PACKAGES = {NGINX: "nginx", PHP_FPM: "php-fpm", str(DOKUWIKI): "dokuwiki"}

WHOAMI = """<?php
header('Content-Type: application/json');
echo json_encode([
    'remote_user' => $_SERVER['REMOTE_USER'] ?? null,
    'php_auth_user' => $_SERVER['PHP_AUTH_USER'] ?? null,
    'x_forwarded_user' => $_SERVER['HTTP_X_FORWARDED_USER'] ?? null,
]);
"""


def require(*paths: str) -> None:
    missing = [f"{path} (Debian's {_PACKAGES[path]})" for path in paths if not os.path.exists(path)]
    if missing:
        raise AssertionError("not installed: " + ", ".join(missing) + "; .ci/run installs them")


@dataclass
class PhpSite:
    url: str
    root: Path  # the document root
    logs: Path


def _stop(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


# The README's recipe: PHP's REMOTE_USER is the gateway's X-Forwarded-User (the later
# fastcgi_param wins over fastcgi.conf's $remote_user in php-fpm).
REMOTE_USER_RECIPE = "fastcgi_param REMOTE_USER $http_x_forwarded_user;"


def _nginx_conf(base: Path, port: int, root: Path, socket: Path, *, recipe: bool) -> str:
    user = "user root root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(f"  {kind}_temp_path {base}/tmp/{kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""{user}worker_processes 1;
pid {base}/nginx.pid;
error_log {base}/logs/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
  include /etc/nginx/mime.types;
  access_log {base}/logs/nginx-access.log;
{temp}
  client_max_body_size 20m;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    index index.php doku.php;
    location ~ ^/(data|conf|bin|inc|vendor)/ {{ deny all; }}
    location ~ \\.php$ {{
      include /etc/nginx/fastcgi.conf;
      {REMOTE_USER_RECIPE if recipe else ""}
      fastcgi_pass unix:{socket};
    }}
  }}
}}
"""


def _fpm_conf(base: Path, socket: Path) -> str:
    owner = "user = root\ngroup = root\n" if os.geteuid() == 0 else ""
    return f"""[global]
pid = {base}/php-fpm.pid
error_log = {base}/logs/php-fpm.log
daemonize = no
[site]
{owner}listen = {socket}
pm = static
pm.max_children = 4
catch_workers_output = yes
php_admin_value[upload_max_filesize] = 20M
php_admin_value[post_max_size] = 20M
php_admin_flag[log_errors] = on
php_admin_value[error_log] = {base}/logs/php-errors.log
"""


@contextlib.contextmanager
def php_site(base: Path, port: int, root: Path, *,
             remote_user_from_gateway: bool = False) -> Iterator[PhpSite]:
    """nginx + php-fpm serving `root` on 127.0.0.1:`port`; stock fastcgi.conf, plus the
    README's REMOTE_USER recipe with `remote_user_from_gateway`."""
    require(NGINX, PHP_FPM)
    for sub in ("logs", "tmp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    socket = base / "php.sock"
    (base / "nginx.conf").write_text(
        _nginx_conf(base, port, root, socket, recipe=remote_user_from_gateway))
    (base / "php-fpm.conf").write_text(_fpm_conf(base, socket))
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    root_flag = ["-R"] if os.geteuid() == 0 else []
    processes = []
    try:
        with (base / "logs" / "console.log").open("ab") as console:
            processes.append(subprocess.Popen(
                [PHP_FPM, "-F", "-y", str(base / "php-fpm.conf"), *root_flag],
                stdout=console, stderr=subprocess.STDOUT, env=env, start_new_session=True))
            processes.append(subprocess.Popen(
                [NGINX, "-p", f"{base}/", "-c", str(base / "nginx.conf"),
                 "-e", str(base / "logs" / "nginx-error.log"), "-g", "daemon off;"],
                stdout=console, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        _wait_until_serving(port, base, processes)
        yield PhpSite(f"http://127.0.0.1:{port}", root, base / "logs")
    finally:
        for process in processes:
            _stop(process)


def _wait_until_serving(port: int, base: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        if any(p.poll() is not None for p in processes) or not (base / "php.sock").exists():
            if any(p.poll() is not None for p in processes):
                break
            time.sleep(0.05)
            continue
        with contextlib.suppress(OSError):
            status, _ = send_raw(port, "/", timeout=2)
            if status < 500:
                return
        time.sleep(0.05)
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted((base / "logs").glob("*")) if p.is_file())
    raise AssertionError(f"nginx + php-fpm did not serve 127.0.0.1:{port}:\n{logs}")


def whoami_root(base: Path) -> Path:
    root = base / "www"
    root.mkdir(parents=True, exist_ok=True)
    (root / "whoami.php").write_text(WHOAMI)
    return root


def dokuwiki_root(base: Path, *, basedir: str) -> Path:
    """A private copy of Debian's DokuWiki: its code (with the symlinked plugins and
    templates), configuration and data under `base`, ACLs off (the gateway is the access
    control), no network calls. `basedir`: the path it is served under, as it should know
    it ('' lets it work it out: right at /, wrong behind a stripped prefix)."""
    require(str(DOKUWIKI))
    root = base / "dokuwiki"
    shutil.copytree(DOKUWIKI, root, symlinks=False,
                    ignore=shutil.ignore_patterns(".htaccess"))
    shutil.copytree("/etc/dokuwiki", base / "conf", symlinks=False)
    shutil.copytree("/var/lib/dokuwiki/data", base / "data", symlinks=False)
    (root / "inc" / "preload.php").write_text(
        f"<?php\nif (!defined('DOKU_CONF')) define('DOKU_CONF', '{base}/conf/');\n")
    (base / "conf" / "local.php").write_text(f"""<?php
$conf['title'] = 'Gateway test wiki';
$conf['savedir'] = '{base}/data';
$conf['useacl'] = 0;
$conf['basedir'] = '{basedir}';
$conf['baseurl'] = '';
$conf['userewrite'] = 0;
$conf['updatecheck'] = 0;
$conf['dnslookups'] = 0;
$conf['send404'] = 0;
""")
    return root

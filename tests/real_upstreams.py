"""Real upstream web servers from Debian's packages (nginx, Apache httpd 2.4, Tomcat 10.1) that
report, on every request, how they themselves understood it.

Why: the gateway decides which route (and so which policy) a request belongs to from the path it
sees; the upstream then picks a file, location or servlet from the path *it* resolves. Any
difference between the two is an authorisation bypass (``/public/..;/admin`` on Tomcat and
friends). These servers answer every request they accept with an empty ``200`` and two headers,
so a test can send a raw target through the gateway and compare the gateway's decision with the
upstream's.

``X-Seen-Port``
    The local TCP port the connection arrived on, in decimal. Each server listens on several
    ports, one per gateway route, so the port says which route the gateway forwarded the request
    for. It never depends on the Host header:

    - nginx: ``$server_port`` (the accepting socket's local port);
    - Apache: a constant in each ``<VirtualHost 127.0.0.1:PORT>``; Apache picks the vhost by the
      connection's local address and port (``%{SERVER_PORT}`` would come from the Host header);
    - Tomcat: ``request.getLocalPort()``.

``X-Resolved-Path``
    The path the server resolved the request to, i.e. what it would use to pick a
    file/location/servlet:

    - nginx: ``$uri`` (``r->uri``, what ``location`` blocks are matched against): the path
      percent-decoded once, dot segments removed, runs of slashes merged (``merge_slashes on``,
      the default), query cut off, and cut at a raw ``#`` (nginx treats ``#`` as the start of a
      fragment). ``;`` is an ordinary character. ``%2F`` decodes to ``/`` and takes part in
      dot-segment removal. Read by a ``perl_set`` handler (``libnginx-mod-http-perl``) from
      ``$r->uri``'s raw bytes.
    - Apache: ``r->uri`` (what it maps to a file), read in mod_headers as
      ``expr=%{escape:%{REQUEST_URI}}``. In ap_expr, unlike the CGI variable of the same name,
      ``REQUEST_URI`` is the decoded, dot-removed, slash-merged (``MergeSlashes On``, the
      default) ``r->uri``; the tests check this (``/A%41`` -> ``/AA``). ``;`` is an ordinary
      character. Apache itself refuses a raw ``#`` (400), ``%2F`` (404, ``AllowEncodedSlashes
      Off``) and ``%00`` (404).
    - Tomcat: ``request.getServletPath() + request.getPathInfo()`` (``null`` -> ``""``), from a
      JSP mapped to ``/*`` in the ROOT webapp (servlet path ``""``, path info the whole path):
      ``;parameters`` stripped from every segment *before* decoding, then decoded as UTF-8, dot
      segments removed (a trailing ``/..`` or ``/.`` leaves no trailing slash), slashes merged.
      Tomcat itself refuses (400) invalid UTF-8, ``%2F``, ``%5C``, raw ``\\``, raw non-ASCII,
      raw ``#``, and an absolute-form target whose host is not the Host header's; paths under
      ``/WEB-INF/`` or ``/META-INF/`` (any case, after normalisation) are 404s of its own.

    Escaping, the same for all three servers: every byte that is an ASCII letter or digit or one
    of ``$-_.+!*'(),:;@&=/~`` is sent as is; every other byte is sent as ``%xx`` with two
    **lowercase** hex digits: 0x00-0x20 (control bytes and space), the 13 printable characters
    ``"#%<>?[\\]^`{|}`` (``%`` itself included), 0x7f, and every byte >= 0x80. So the header
    is printable ASCII without spaces, and ``urllib.parse.unquote_to_bytes(value)``
    (:func:`resolved_path`) gives back the exact path bytes: for nginx and Apache the bytes they
    decoded, valid UTF-8 or not; for Tomcat the UTF-8 encoding of the Java string it decoded.
    ``+`` is a literal plus: never decode with ``unquote_plus``. This is Apache's own
    ``ap_escape_uri`` (ap_expr ``escape()``); the nginx perl handler and the Tomcat JSP are
    written to match it, and the tests check all three against :func:`escape_like_apache`,
    byte by byte.

    When a server refuses a request itself (400, Apache's 404 for ``%2F``, Tomcat's 404 for
    ``/WEB-INF/``...), both headers are missing: nginx and Apache add them only to successful
    answers (``add_header`` without ``always``, ``Header set`` without ``always``) and Tomcat only
    when the JSP runs. Read "no ``X-Resolved-Path``" as "refused".

Each server runs as a child process in the foreground, in a process group of its own, listening
on 127.0.0.1 only, on the ports the caller gives, with config, pid file, logs and temp files in a
fresh directory under the caller's. ``Server.stop()`` ends the whole process group. A missing
package makes the start function call ``pytest.skip`` with the package to install.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import pytest
from ports import free_port

NGINX = "/usr/sbin/nginx"
NGINX_PERL_MODULE = "/usr/lib/nginx/modules/ngx_http_perl_module.so"
APACHE = "/usr/sbin/apache2"
APACHE_MODULES = "/usr/lib/apache2/modules"
CATALINA_HOME = "/usr/share/tomcat10"
#: Tomcat's JSP compiler (ECJ). Debian's jasper.jar names it in its manifest Class-Path, but that
#: resolves next to /usr/share/tomcat10/lib/jasper.jar (a symlink), where it is not, so
#: common.loader lists it explicitly.
ECJ_JAR = "/usr/share/java/eclipse-jdt-core.jar"

#: Punctuation sent unescaped in X-Resolved-Path (besides ASCII letters and digits): Apache's
#: ap_escape_uri set, mirrored by the nginx and Tomcat handlers.
SAFE_PUNCTUATION = "$-_.+!*'(),:;@&=/~"
_SAFE_BYTES = frozenset((string.ascii_letters + string.digits + SAFE_PUNCTUATION).encode())

STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


def escape_like_apache(path: bytes) -> str:
    """The X-Resolved-Path value every server sends for the resolved `path` (see the module
    docstring); tests compare the servers' headers with it."""
    return "".join(chr(b) if b in _SAFE_BYTES else f"%{b:02x}" for b in path)


def resolved_path(headers: Mapping[str, str]) -> bytes | None:
    """The path the server resolved, from headers as :func:`send_raw` returns them, or None when
    the server refused the request itself (no X-Resolved-Path)."""
    value = headers.get("x-resolved-path")
    return None if value is None else urllib.parse.unquote_to_bytes(value)


@dataclass
class Server:
    """A running server: its name, the ports it listens on, and how to stop it."""

    name: str
    ports: tuple[int, ...]
    process: subprocess.Popen[bytes]
    directory: Path
    error_log: Path
    #: Directories made outside `directory` (Apache's world-readable DocumentRoot) to delete.
    extra_dirs: list[Path] = field(default_factory=list)

    def stop(self) -> None:
        """End every process of the server's process group: SIGTERM, SIGKILL for what is left
        after STOP_TIMEOUT. Idempotent. The group is the child's own (start_new_session), so
        this never touches anything it did not start."""
        pgid = self.process.pid
        _signal_group(pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _signal_group(pgid, signal.SIGKILL)
            self.process.wait(timeout=STOP_TIMEOUT)
        # Workers that outlive their master keep the group alive: give them time, then kill.
        end = time.monotonic() + STOP_TIMEOUT
        while _group_alive(pgid) and time.monotonic() < end:
            time.sleep(0.02)
        _signal_group(pgid, signal.SIGKILL)
        for extra in self.extra_dirs:
            shutil.rmtree(extra, ignore_errors=True)

    def alive(self) -> bool:
        """Whether any process of the server's process group is still there."""
        return self.process.poll() is None or _group_alive(self.process.pid)

    def error_text(self) -> str:
        """The end of the server's error log and of its stdout/stderr, for failure messages."""
        console = self.directory / "console.log"
        if console == self.error_log:
            return _read_tail(console)
        return f"{_read_tail(self.error_log)}\n--- stdout/stderr:\n{_read_tail(console)}"

    def __enter__(self) -> Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _read_tail(path: Path, limit: int = 6000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"(no log at {path}: {error})"
    return text[-limit:] or "(empty)"


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports on 127.0.0.1 (see ports.py)."""
    return [free_port() for _ in range(count)]


def send_raw(
    port: int,
    target: bytes | str,
    host: str = "127.0.0.1",
    *,
    method: str = "GET",
    timeout: float = 10.0,
) -> tuple[int, dict[str, str]]:
    """Send ``<method> <target> HTTP/1.1`` to 127.0.0.1:`port` with the target bytes exactly as
    given (a str is encoded as latin-1), with no client-side normalisation or quoting, which is
    the whole point; then ``Host`` and ``Connection: close``. Read the whole answer and return
    the status and the headers: names lower-cased, values decoded as latin-1 and stripped, a
    repeated header keeping its last value. Raises ConnectionError without a status line."""
    raw_target = target.encode("latin-1") if isinstance(target, str) else target
    request = b"".join(
        (
            method.encode("ascii"),
            b" ",
            raw_target,
            b" HTTP/1.1\r\nHost: ",
            host.encode("latin-1"),
            b"\r\nConnection: close\r\n\r\n",
        )
    )
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    answer = b"".join(chunks)
    lines = answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    status_line = lines[0].split(b" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/"):
        raise ConnectionError(f"no HTTP status line from port {port}: {answer[:200]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
    return int(status_line[1]), headers


def _wait_ready(server: Server, deadline: float) -> None:
    """Wait until every port answers a request with its own X-Seen-Port; raise with the logs if
    the process exits or the deadline passes. A real request rather than a bare connect, so
    that the first request of a test finds every server (and Tomcat's JSP) warm."""
    end = time.monotonic() + deadline
    pending = list(server.ports)
    last = "no answer yet"
    while pending:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited with status {server.process.returncode} before "
                f"answering on 127.0.0.1:{pending}; its logs ({server.directory}):\n"
                f"{server.error_text()}"
            )
        port = pending[0]
        try:
            status, headers = send_raw(port, "/", timeout=5.0)
        except OSError as error:
            last = repr(error)
        else:
            if headers.get("x-seen-port") == str(port):
                pending.pop(0)
                continue
            last = f"status {status}, headers {headers}"
        if time.monotonic() > end:
            raise RuntimeError(
                f"{server.name} did not answer on 127.0.0.1:{port} within {deadline:.0f}s "
                f"(last: {last}); its logs ({server.directory}):\n{server.error_text()}"
            )
        time.sleep(0.05)


def _spawn(
    name: str,
    ports: Sequence[int],
    argv: Sequence[str],
    directory: Path,
    error_log: Path,
    *,
    env: dict[str, str],
    extra_dirs: Sequence[Path] = (),
) -> Server:
    """Start `argv` in a new session (so in its own process group, which stop() kills whole),
    stdout and stderr into console.log in `directory` (nothing is lost, no pipe can fill up),
    then wait until every port answers. Stops it again if that fails or is interrupted."""
    with (directory / "console.log").open("ab") as console:
        process = subprocess.Popen(
            list(argv),
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    server = Server(name, tuple(ports), process, directory, error_log, list(extra_dirs))
    try:
        _wait_ready(server, STARTUP_TIMEOUT)
    except BaseException:
        server.stop()
        raise
    return server


def _require(path: str, package: str) -> None:
    if not os.path.exists(path):
        pytest.skip(f"{path} is missing: install Debian's {package} package (.ci/run does)")


def _base_env() -> dict[str, str]:
    """A small, predictable environment: servers must not pick up the developer's settings."""
    return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8"}


# --------------------------------------------------------------------------------------- nginx

_NGINX_PERL = r"""package ResolvedPath;
use strict;
use warnings;

# X-Resolved-Path: nginx's decoded, normalised $uri as raw bytes, escaped like Apache's
# ap_escape_uri: letters, digits and $-_.+!*'(),:;@&=/~ as is, every other byte as %xx.
sub handler {
    my $r = shift;
    my $uri = $r->uri;
    $uri =~ s/([^A-Za-z0-9\$\-_.+!*'(),:;@&=\/~])/sprintf("%%%02x", ord($1))/ge;
    return $uri;
}

1;
"""


def start_nginx(directory: Path, ports: Sequence[int]) -> Server:
    """nginx with one ``server`` listening on every port, whose ``location /`` answers an empty
    ``200`` with the two headers. Needs Debian's nginx and libnginx-mod-http-perl (the only
    way to escape ``$uri`` in stock nginx: ``add_header`` would send a decoded newline raw)."""
    _require(NGINX, "nginx")
    _require(NGINX_PERL_MODULE, "libnginx-mod-http-perl")
    base = Path(tempfile.mkdtemp(prefix="nginx-", dir=directory))
    for sub in ("logs", "tmp", "perl"):
        (base / sub).mkdir()
    (base / "perl" / "ResolvedPath.pm").write_text(_NGINX_PERL)
    error_log = base / "logs" / "error.log"
    listen = "\n".join(f"    listen 127.0.0.1:{port};" for port in ports)
    # As root, workers stay root: they read nothing but the perl module in our 0700 tmp dir.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    temp_paths = "\n".join(
        f"  {kind}_temp_path {base}/tmp/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = base / "nginx.conf"
    conf.write_text(f"""load_module {NGINX_PERL_MODULE};
{user}worker_processes 1;
pid {base}/nginx.pid;
error_log {error_log} warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
{temp_paths}
  default_type text/plain;
  perl_modules {base}/perl;
  perl_require ResolvedPath.pm;
  perl_set $resolved_path ResolvedPath::handler;
  server {{
{listen}
    server_name _;
    location / {{
      add_header X-Seen-Port $server_port;
      add_header X-Resolved-Path $resolved_path;
      return 200 "";
    }}
  }}
}}
""")
    argv = [NGINX, "-p", f"{base}/", "-c", str(conf), "-e", str(error_log), "-g", "daemon off;"]
    return _spawn("nginx", ports, argv, base, error_log, env=_base_env())


def start_nginx_site(directory: Path, port: int, site: str) -> Server:
    """Debian's nginx serving `site` (server blocks and upstreams, as a file under
    sites-enabled would hold them) on 127.0.0.1:`port`. Every answer carries X-Seen-Port, so
    readiness is known whatever the site does with `/`."""
    _require(NGINX, "nginx")
    base = Path(tempfile.mkdtemp(prefix="nginx-site-", dir=directory))
    for sub in ("logs", "tmp"):
        (base / sub).mkdir()
    error_log = base / "logs" / "error.log"
    user = "user root root;\n" if os.geteuid() == 0 else ""
    temp_paths = "\n".join(
        f"  {kind}_temp_path {base}/tmp/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = base / "nginx.conf"
    conf.write_text(f"""{user}worker_processes 1;
pid {base}/nginx.pid;
error_log {error_log} info;
events {{ worker_connections 256; }}
http {{
  access_log {base}/logs/access.log;
{temp_paths}
  default_type text/plain;
  add_header X-Seen-Port $server_port always;
{site}
}}
""")
    argv = [NGINX, "-p", f"{base}/", "-c", str(conf), "-e", str(error_log), "-g", "daemon off;"]
    return _spawn("nginx", [port], argv, base, error_log, env=_base_env())


# -------------------------------------------------------------------------------------- Apache


def start_apache(directory: Path, ports: Sequence[int]) -> Server:
    """Apache httpd 2.4 (event MPM, one child) with one ``<VirtualHost 127.0.0.1:PORT>`` per
    port. ``AliasMatch`` maps every URI to one empty file, so the default handler answers an
    empty ``200`` while ``r->uri`` keeps what Apache resolved. Needs Debian's apache2-bin.

    Started as root, Apache will not serve as root (its children become ``nobody``), and the
    children must stat the file they serve; pytest's temp dirs are 0700, so then the (empty)
    DocumentRoot is a world-readable directory in the system temp dir that ``stop()``
    deletes."""
    _require(APACHE, "apache2-bin")
    base = Path(tempfile.mkdtemp(prefix="apache-", dir=directory))
    for sub in ("logs", "run"):
        (base / sub).mkdir()
    error_log = base / "logs" / "error.log"
    extra_dirs: list[Path] = []
    if os.geteuid() == 0:
        docroot = Path(tempfile.mkdtemp(prefix="gateway-apache-docroot-"))
        extra_dirs.append(docroot)
        docroot.chmod(0o755)
        user = "User nobody\nGroup nogroup\n"
    else:
        docroot = base / "docroot"
        docroot.mkdir()
        user = ""
    (docroot / "empty").write_bytes(b"")
    (docroot / "empty").chmod(0o644)
    modules = "\n".join(
        f"LoadModule {name}_module {APACHE_MODULES}/mod_{name}.so"
        for name in ("mpm_event", "authz_core", "alias", "headers")
    )
    listen = "\n".join(f"Listen 127.0.0.1:{port}" for port in ports)
    vhosts = "\n".join(
        f"""<VirtualHost 127.0.0.1:{port}>
    Header set X-Seen-Port "{port}"
    Header set X-Resolved-Path "expr=%{{escape:%{{REQUEST_URI}}}}"
</VirtualHost>"""
        for port in ports
    )
    conf = base / "httpd.conf"
    conf.write_text(f"""ServerRoot "{base}"
ServerName 127.0.0.1
{modules}
{user}PidFile "{base}/run/httpd.pid"
DefaultRuntimeDir "{base}/run"
ErrorLog "{error_log}"
LogLevel warn
StartServers 1
ServerLimit 1
ThreadsPerChild 32
MaxRequestWorkers 32
MinSpareThreads 1
MaxSpareThreads 64
{listen}
DocumentRoot "{docroot}"
<Directory "{docroot}">
    Require all granted
</Directory>
AliasMatch "^" "{docroot}/empty"
{vhosts}
""")
    argv = [APACHE, "-d", str(base), "-f", str(conf), "-DFOREGROUND"]
    try:
        return _spawn(
            "apache", ports, argv, base, error_log, env=_base_env(), extra_dirs=extra_dirs
        )
    except BaseException:
        for extra in extra_dirs:
            shutil.rmtree(extra, ignore_errors=True)
        raise


# -------------------------------------------------------------------------------------- Tomcat

_TOMCAT_JSP = """<%@ page session="false" contentType="text/plain" trimDirectiveWhitespaces="true"
%><%
    // X-Resolved-Path: the path Tomcat resolved (servlet path + path info) as UTF-8 bytes,
    // escaped like Apache's ap_escape_uri: letters, digits and SAFE as is, every other
    // byte as %xx (lowercase hex).
    String info = request.getPathInfo();
    String path = request.getServletPath() + (info == null ? "" : info);
    StringBuilder escaped = new StringBuilder();
    for (byte b : path.getBytes(java.nio.charset.StandardCharsets.UTF_8)) {
        int c = b & 0xff;
        boolean safe = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')
            || (c < 0x80 && "SAFE".indexOf(c) >= 0);
        if (safe) {
            escaped.append((char) c);
        } else {
            escaped.append('%').append(Character.forDigit(c >> 4, 16))
                .append(Character.forDigit(c & 15, 16));
        }
    }
    response.setHeader("X-Seen-Port", Integer.toString(request.getLocalPort()));
    response.setHeader("X-Resolved-Path", escaped.toString());
%>""".replace("SAFE", SAFE_PUNCTUATION)

# The "jsp" servlet is declared here because there is no global conf/web.xml; load-on-startup
# makes Jasper compile the JSP before the connectors open, so "answers" means "answers fast".
_TOMCAT_WEB_XML = """<?xml version="1.0" encoding="UTF-8"?>
<web-app xmlns="https://jakarta.ee/xml/ns/jakartaee" version="6.0" metadata-complete="true">
  <servlet>
    <servlet-name>jsp</servlet-name>
    <servlet-class>org.apache.jasper.servlet.JspServlet</servlet-class>
    <init-param><param-name>development</param-name><param-value>false</param-value></init-param>
  </servlet>
  <servlet>
    <servlet-name>resolved</servlet-name>
    <jsp-file>/resolved.jsp</jsp-file>
    <load-on-startup>1</load-on-startup>
  </servlet>
  <servlet-mapping>
    <servlet-name>resolved</servlet-name>
    <url-pattern>/*</url-pattern>
  </servlet-mapping>
</web-app>
"""

_TOMCAT_CONTEXT_XML = """<?xml version="1.0" encoding="UTF-8"?>
<Context>
  <JarScanner scanClassPath="false" scanManifest="false" scanAllDirectories="false"/>
</Context>
"""

# Skipping every jar from TLD and annotation scanning is most of a fast startup.
_TOMCAT_PROPERTIES = f"""common.loader="${{catalina.home}}/lib/*.jar","{ECJ_JAR}"
server.loader=
shared.loader=
tomcat.util.scan.StandardJarScanFilter.jarsToSkip=*.jar
tomcat.util.scan.StandardJarScanFilter.jarsToScan=
"""

_TOMCAT_LOGGING = """handlers = java.util.logging.ConsoleHandler
.handlers = java.util.logging.ConsoleHandler
.level = WARNING
java.util.logging.ConsoleHandler.level = WARNING
java.util.logging.ConsoleHandler.formatter = org.apache.juli.OneLineFormatter
"""


def start_tomcat(directory: Path, ports: Sequence[int]) -> Server:
    """Tomcat 10.1 from Debian's tomcat10-common, run by ``catalina.sh run`` in the foreground,
    with one HTTP/1.1 connector per port on 127.0.0.1 and nothing else: no shutdown port, no
    AJP, no lifecycle listeners, only the ROOT webapp with its one JSP (compiled by Debian's
    ECJ at startup). The Tomcat defaults that decide path handling are all left alone. Its
    console output (level WARNING) is the error log."""
    catalina = f"{CATALINA_HOME}/bin/catalina.sh"
    _require(catalina, "tomcat10-common")
    _require(ECJ_JAR, "libeclipse-jdt-core-java")
    if shutil.which("java") is None:
        pytest.skip("java is missing: install a Java runtime (tomcat10-common depends on one)")
    base = Path(tempfile.mkdtemp(prefix="tomcat-", dir=directory))
    for sub in ("conf", "logs", "temp", "work", "webapps/ROOT/WEB-INF"):
        (base / sub).mkdir(parents=True)
    connectors = "\n".join(
        f'    <Connector address="127.0.0.1" port="{port}" protocol="HTTP/1.1" '
        'connectionTimeout="20000" maxThreads="32" />'
        for port in ports
    )
    (base / "conf" / "server.xml").write_text(f"""<?xml version="1.0" encoding="UTF-8"?>
<Server port="-1" shutdown="SHUTDOWN">
  <Service name="Catalina">
{connectors}
    <Engine name="Catalina" defaultHost="localhost">
      <Host name="localhost" appBase="webapps" unpackWARs="false" autoDeploy="false"
            deployOnStartup="true" />
    </Engine>
  </Service>
</Server>
""")
    (base / "conf" / "catalina.properties").write_text(_TOMCAT_PROPERTIES)
    (base / "conf" / "logging.properties").write_text(_TOMCAT_LOGGING)
    (base / "conf" / "context.xml").write_text(_TOMCAT_CONTEXT_XML)
    (base / "webapps" / "ROOT" / "WEB-INF" / "web.xml").write_text(_TOMCAT_WEB_XML)
    (base / "webapps" / "ROOT" / "resolved.jsp").write_text(_TOMCAT_JSP)
    env = {
        **_base_env(),
        "CATALINA_HOME": CATALINA_HOME,
        "CATALINA_BASE": str(base),
        "CATALINA_TMPDIR": str(base / "temp"),
        # Fail fast (exit) when a port cannot be bound instead of running without it; startup
        # speed: small heap, serial GC, only the quick JIT tier.
        "CATALINA_OPTS": "-Dorg.apache.catalina.startup.EXIT_ON_INIT_FAILURE=true "
        "-Xms32m -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1",
    }
    if "JAVA_HOME" in os.environ:
        env["JAVA_HOME"] = os.environ["JAVA_HOME"]
    console = base / "console.log"
    server = _spawn("tomcat", ports, [catalina, "run"], base, console, env=env)
    # catalina.sh run writes no pid file; it execs java, so the child's pid is Tomcat's.
    (base / "tomcat.pid").write_text(f"{server.process.pid}\n")
    return server

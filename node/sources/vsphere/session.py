"""A logged-in vSphere session: pyvmomi over verified TLS, and HTTPS GETs of
disk exports with the session's cookie.

TLS is verified by default, against the system's CAs or --ca-file (only that
CA), host name included. pyVim skips verification for localhost when it is not
given a context, so a context is always passed. --insecure turns verification
off, and says so.

Every failure to get a session is one UserError line: wrong user or password,
host unreachable, certificate not trusted (with what to do), not a vSphere API.
"""
from __future__ import annotations

import http.client
import socket
import ssl
import urllib.parse

from hypersdk.node.errors import UserError

TIMEOUT = 60.0                  # seconds for a connect or a read to make progress


class Http:
    """HTTPS GETs of one server's disk exports, with a session cookie."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext, cookie: str | None,
                 timeout: float = TIMEOUT):
        self.host, self.port, self.ctx, self.cookie = host, port, ctx, cookie
        self.timeout = timeout

    def get(self, url: str, start: int | None = None, end: int | None = None, conn=None):
        """(connection, response) of a GET of `url` (bytes start..end-1 when given),
        with the session cookie; the caller reads the body and closes the
        connection, or passes it back as `conn` once the body is read whole (keep-
        alive: a run of small Range reads costs no TLS handshake each). UserError for
        a refused request."""
        u = urllib.parse.urlsplit(url)
        if u.hostname != self.host:
            raise UserError(f"vSphere {self.host}: export URL on another host {u.hostname!r}")
        headers = {"Cookie": self.cookie} if self.cookie else {}
        if start is not None:
            headers["Range"] = f"bytes={start}-{end - 1}"
        target = u.path + (f"?{u.query}" if u.query else "")
        resp = None
        if conn is not None:
            try:
                conn.request("GET", target, headers=headers)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException):
                conn.close()                     # the server closed it: a new one below
                resp = None
        if resp is None:
            conn = http.client.HTTPSConnection(u.hostname, u.port or 443, context=self.ctx,
                                               timeout=self.timeout)
            try:
                conn.request("GET", target, headers=headers)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise UserError(f"vSphere {self.host}: reading a disk export failed: "
                                f"{_why(exc)}") from None
        want = 206 if start is not None else 200
        if resp.status != want:
            conn.close()
            raise UserError(f"vSphere {self.host}: disk export answered HTTP "
                            f"{resp.status} {resp.reason} (wanted {want})")
        return conn, resp


def put(http_: Http, path: str, query: str, body, length: int) -> None:
    """PUT `length` bytes (an iterable of bytes-likes) to https://HOST:PORT/path?query
    (a datastore file: /folder/...). UserError when the upload fails."""
    conn = http.client.HTTPSConnection(http_.host, http_.port, context=http_.ctx,
                                       timeout=http_.timeout)
    headers = {"Content-Length": str(length), "Content-Type": "application/octet-stream"}
    if http_.cookie:
        headers["Cookie"] = http_.cookie
    try:
        conn.request("PUT", f"{path}?{query}", body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
    except (OSError, http.client.HTTPException) as exc:
        raise UserError(f"vSphere {http_.host}: upload of {path} failed: {_why(exc)}") from None
    finally:
        conn.close()
    if resp.status not in (200, 201, 204):
        raise UserError(f"vSphere {http_.host}: upload of {path} answered HTTP {resp.status} "
                        f"{resp.reason}")


class Session:
    """si: pyVmomi's ServiceInstance; content: its content; http: GETs of exports."""

    def __init__(self, url, si, ctx: ssl.SSLContext, timeout: float):
        self.url, self.si, self.ctx, self.timeout = url, si, ctx, timeout
        self.content = si.RetrieveContent()
        # vCenter wants the session cookie on /folder and /nfc GETs
        self.http = Http(url.host, url.port, ctx, si._stub.cookie, timeout)

    def close(self) -> None:
        from pyVim.connect import Disconnect
        try:
            Disconnect(self.si)
        except Exception:                         # logging out of a dead session: nothing to do
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def nfc_url(self, url: str) -> str:
        """An export lease's device URL with its `*` host replaced by ours."""
        return url.replace("*", f"{self.url.host}:{self.url.port}", 1)


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def tls_context(*, insecure: bool = False, ca_file: str | None = None) -> ssl.SSLContext:
    if insecure:
        return ssl._create_unverified_context()
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"--ca-file {ca_file}: {_why(exc)}") from None


def connect(url, password: str, *, insecure: bool = False, ca_file: str | None = None,
            timeout: float = TIMEOUT) -> Session:
    """Log in to the vSphere API of url (url.VsphereUrl)."""
    from pyVim.connect import SmartConnect
    from pyVmomi import vim
    ctx = tls_context(insecure=insecure, ca_file=ca_file)
    where = f"vSphere {url.host}:{url.port}"
    try:
        si = SmartConnect(host=url.host, port=url.port, user=url.user, pwd=password,
                          sslContext=ctx, connectionPoolTimeout=timeout)
    except vim.fault.InvalidLogin:
        raise UserError(f"{where}: login failed for {url.user} (wrong user or password)") \
            from None
    except ssl.SSLCertVerificationError as exc:
        raise UserError(f"{where}: TLS certificate not trusted ({exc.verify_message}): pass "
                        "--ca-file FILE with the CA that signed it (or --insecure to skip the "
                        "check)") from None
    except (ConnectionError, socket.timeout, socket.gaierror, TimeoutError) as exc:
        raise UserError(f"{where}: unreachable ({_why(exc)})") from None
    except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
        raise UserError(f"{where}: connection failed ({_why(exc)})") from None
    except vim.fault.VimFault as exc:
        raise UserError(f"{where}: login refused ({exc.msg})") from None
    except Exception as exc:              # pyVmomi raises its own for a non-vSphere endpoint
        raise UserError(f"{where}: not a vSphere API endpoint ({_why(exc)})") from None
    return Session(url, si, ctx, timeout)

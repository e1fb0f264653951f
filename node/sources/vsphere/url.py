"""vsphere:// URLs and where the password comes from.

    vsphere://USER@HOST[:PORT]/DATACENTER/vm/PATH

PATH is the VM's inventory path under the datacenter's VM folder (folders
included, e.g. prod/web01). The password is never in argv or the URL (argv is
visible to every local user in ps): it comes from HYPERSDK_VSPHERE_PASSWORD or
from a credentials file named by --credentials, readable by its owner only
(mode 0600 or stricter), whose first line is the password.
"""
from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass

from hypersdk.node.errors import UserError
from hypersdk.node.files import NotPrivate, read_private

SCHEME = "vsphere://"
PASSWORD_ENV = "HYPERSDK_VSPHERE_PASSWORD"
FORM = "vsphere://USER@HOST[:PORT]/DATACENTER/vm/PATH"
MAX_CREDENTIALS = 4096


@dataclass(frozen=True)
class VsphereUrl:
    user: str
    host: str
    port: int
    datacenter: str
    vm_path: str                 # under the datacenter's vm folder

    @property
    def inventory_path(self) -> str:
        return f"{self.datacenter}/vm/{self.vm_path}"

    def __str__(self) -> str:
        port = "" if self.port == 443 else f":{self.port}"
        return f"{SCHEME}{self.user}@{self.host}{port}/{self.inventory_path}"


def is_vsphere(text: str) -> bool:
    return text.startswith(SCHEME)


def parse(text: str) -> VsphereUrl:
    """The URL's parts; UserError (one line) naming what is wrong."""
    if not is_vsphere(text):
        raise UserError(f"not a vSphere URL {text!r}: use {FORM}")
    u = urllib.parse.urlsplit(text)
    if u.password is not None:
        raise UserError("a password in the vSphere URL would show in the process list: "
                        f"set {PASSWORD_ENV} or pass --credentials FILE instead")
    try:
        port = u.port or 443
    except ValueError:
        raise UserError(f"bad port in {text!r}: use {FORM}") from None
    if not u.username or not u.hostname:
        raise UserError(f"{text!r} needs a user and a host: {FORM}")
    parts = urllib.parse.unquote(u.path).strip("/").split("/")
    if len(parts) < 3 or parts[1] != "vm" or not parts[0] or not all(parts[2:]):
        raise UserError(f"{text!r} does not name a VM: {FORM}")
    if u.query or u.fragment:
        raise UserError(f"{text!r}: no query or fragment allowed: {FORM}")
    return VsphereUrl(urllib.parse.unquote(u.username), u.hostname, port, parts[0],
                      "/".join(parts[2:]))


def password(credentials: str | None, env=os.environ) -> str:
    """The password: from the credentials file when given, else the environment."""
    if credentials is not None:
        try:
            data, _ = read_private(credentials, MAX_CREDENTIALS, "credentials file")
        except NotPrivate as exc:
            raise UserError(str(exc)) from None
        if len(data) > MAX_CREDENTIALS:
            raise UserError(f"credentials file {credentials}: more than {MAX_CREDENTIALS} bytes")
        line = data.decode("utf-8", "replace").splitlines()[0] if data else ""
        if not line:
            raise UserError(f"credentials file {credentials}: the first line (the password) is "
                            "empty")
        return line
    pw = env.get(PASSWORD_ENV)
    if not pw:
        raise UserError(f"no vSphere password: set {PASSWORD_ENV} or pass --credentials FILE "
                        "(mode 0600, the password on its first line)")
    return pw

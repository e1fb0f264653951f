"""vsphere:// URLs and the password's sources (node/sources/vsphere/url.py)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypersdk.node.errors import UserError
from hypersdk.node.sources.vsphere import url as vurl

name = st.text(st.characters(whitelist_categories=("L", "N"), whitelist_characters="-_."),
               min_size=1, max_size=12)


@given(user=name, dc=name, folders=st.lists(name, min_size=1, max_size=3),
       port=st.sampled_from([443, 8443, 1]))
def test_round_trip(user, dc, folders, port):
    import urllib.parse
    q = lambda s: urllib.parse.quote(s, safe="")
    text = (f"vsphere://{q(user)}@vc.example:{port}/{q(dc)}/vm/"
            + "/".join(q(f) for f in folders))
    u = vurl.parse(text)
    assert (u.user, u.host, u.port, u.datacenter, u.vm_path) == (user, "vc.example", port, dc,
                                                                 "/".join(folders))
    assert u.inventory_path == f"{dc}/vm/{'/'.join(folders)}"


@pytest.mark.parametrize("text,fragment", [
    ("vsphere://vc/DC/vm/x", "needs a user"),
    ("vsphere://u@vc/DC/host/x", "does not name a VM"),
    ("vsphere://u@vc/DC/vm/", "does not name a VM"),
    ("vsphere://u@vc/DC/vm//x", "does not name a VM"),
    ("vsphere://u@vc:99999/DC/vm/x", "bad port"),
    ("vsphere://u:secret@vc/DC/vm/x", "process list"),
    ("vsphere://u@vc/DC/vm/x?y=1", "no query"),
    ("https://u@vc/DC/vm/x", "not a vSphere URL"),
])
def test_bad_urls_say_what_is_wrong(text, fragment):
    with pytest.raises(UserError, match=fragment):
        vurl.parse(text)


def test_password_sources(tmp_path):
    env = {vurl.PASSWORD_ENV: "from-env"}
    assert vurl.password(None, env) == "from-env"
    with pytest.raises(UserError, match="no vSphere password"):
        vurl.password(None, {})
    f = tmp_path / "creds"
    f.write_text("s3cret\nignored\n")
    f.chmod(0o600)
    assert vurl.password(str(f), env) == "s3cret"            # the file wins over env
    f.chmod(0o640)
    with pytest.raises(UserError, match="accessible by others"):
        vurl.password(str(f), env)
    f.chmod(0o600)
    f.write_text("\n")
    with pytest.raises(UserError, match="empty"):
        vurl.password(str(f), env)
    with pytest.raises(UserError, match="does not exist"):
        vurl.password(str(tmp_path / "none"), env)
    with pytest.raises(UserError, match="not a regular file"):
        vurl.password(str(tmp_path), env)

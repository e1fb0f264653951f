"""A second node on a TCP port already in use: real `hypersdk node run`
processes on 127.0.0.1. py-libp2p's listener sets SO_REUSEPORT, which let a
second node "listen" on the same port (and steal half of the first one's
inbound connections); ours refuses with one clear line and leaves nothing
behind, the first node keeps its port, and the port is free again (TIME_WAIT
or not) as soon as the first node stops. Port 0 keeps working everywhere else
(every other test listens on /tcp/0)."""
from __future__ import annotations

import os
import socket
import subprocess

import pytest
import trio
from conftest import HYPERSDK, Cli, cli_env
from test_cli import one_error_line
from test_node_cli import START_BUDGET, budget, nodes, poll, status  # noqa: F401 (fixture)


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick; without SO_REUSEPORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_refused(cli: Cli, listen: str) -> subprocess.CompletedProcess:
    """`node run --listen listen` on cli's data dir, which must exit by itself
    before it is ready (the bug: it printed "ready" and ran on)."""
    proc = subprocess.Popen([str(HYPERSDK), "node", "run", "--listen", listen],
                            env=cli_env(cli.data_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        def exited_or_ready():
            return proc.poll() is not None or (cli.data_dir / "node.addrs").exists()
        poll(exited_or_ready, budget(START_BUDGET), f"node run --listen {listen} to exit")
        assert proc.poll() is not None, "the second node started on a port in use"
        out, err = proc.communicate(timeout=budget(START_BUDGET))
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=budget(START_BUDGET))


def test_second_node_on_a_port_in_use_fails_cleanly(tmp_path, nodes):
    port = free_port()
    listen = f"/ip4/127.0.0.1/tcp/{port}"
    a, b, c = Cli(tmp_path / "a"), Cli(tmp_path / "b"), Cli(tmp_path / "c")
    na = nodes(a, listen=listen)
    assert na.addr.startswith(f"{listen}/p2p/")
    b("node", "init")
    before = sorted(os.listdir(b.data_dir))
    for taken in (listen, f"/ip4/0.0.0.0/tcp/{port}"):      # the wildcard overlaps too
        p = run_refused(b, taken)
        one_error_line(p, f"cannot listen on {taken}: address in use", "--listen")
        assert p.returncode == 1 and "ready" not in p.stdout, p.stdout
        # nothing left behind: no control socket, no node.addrs, no store
        assert sorted(os.listdir(b.data_dir)) == sorted(before + ["node.lock"])
    # A still owns its port: a node that dials it reaches A, every time
    nc = nodes(c)
    a_id = status(a)["node_id"]
    assert c.json("join", f"{listen}/p2p/{status(a)['peer_id']}")["node_id"] == a_id
    assert [p["node_id"] for p in c.json("peers")] == [a_id]
    assert na.stop() == 0
    # the port is free once A is gone (its closed connections in TIME_WAIT or not)
    nb = nodes(b, listen=listen)
    assert nb.addr.startswith(f"{listen}/p2p/")
    assert nc.proc.poll() is None


async def test_transport_refuses_a_port_in_use_and_keeps_port_zero():
    from conftest import echo, read_exactly

    from hypersdk.node.net.p2p_transport import P2PTransport
    from hypersdk.node.net.transport import TransportError
    port = free_port()
    first = P2PTransport(listen=f"/ip4/127.0.0.1/tcp/{port}")
    first.set_handler("/echo", echo)
    with trio.fail_after(budget(START_BUDGET)):
        async with trio.open_nursery() as n:
            await n.start(first.run)
            for addr in (f"/ip4/127.0.0.1/tcp/{port}", f"/ip4/0.0.0.0/tcp/{port}"):
                with pytest.raises(TransportError, match=f"cannot listen on {addr}: "
                                                         "address in use"):
                    await n.start(P2PTransport(listen=addr).run)
            with pytest.raises(TransportError, match="expected /ip4/<ip>/tcp/<port>"):
                await n.start(P2PTransport(listen="/ip4/127.0.0.1/udp/5").run)
            # two transports on port 0 get two ports, and talk through the fixed one
            zero = [P2PTransport(), P2PTransport()]
            for t in zero:
                await n.start(t.run)
            assert zero[0].addr.split("/")[4] != zero[1].addr.split("/")[4] != "0"
            s = await zero[0].open_stream(first.peer_id, first.addr, "/echo")
            await s.send_all(b"ping")
            assert await read_exactly(s, 4) == b"ping"
            await s.aclose()
            n.cancel_scope.cancel()
    # closed on the way out: the port binds again at once
    again = P2PTransport(listen=f"/ip4/127.0.0.1/tcp/{port}")
    again.bind()
    again.close_listener()

"""The node process: scheduling and the control socket.

    daemon.py   Daemon: runs the transport, the DHT, the services; answers
                control requests by running the operations of hypersdk.node.service
    control.py  the control socket's framing and its client

May import the service layer and everything below it; never the CLI.
"""

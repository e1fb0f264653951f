"""Wire formats and signed records: pure code, no I/O (no trio, sockets, files or clocks)."""

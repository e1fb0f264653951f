"""Where images come from: local raw images and block devices (local.py); the
vSphere source will live here too.

A source gives the chunker a consistent image or refuses: positional reads
bounded by the size seen at the start, holes found without reading, and a
check that nothing changed by the end.

May import: hypersdk.protocol, hypersdk.node.errors / config.
"""

"""The chunk store: content-addressed chunks in append-only packs, indexed by SQLite.

    store.py      ChunkStore: the index, pack reads verified against their ids
    packfile.py   the pack record format; pack_direct.py  O_DIRECT appends
    sealed.py     sealed records (encryption at rest): sealing, opening, missing keys
    writer.py     PackWriter: the one writer, batch commits (fdatasync, then rows)
    catalog.py    named backups, versions, REF resolution, manifests, hash lists
    chunker.py    reading an image source into chunks (hash, zero test, compress)
    delta.py      chunks stored as zstd deltas against the previous version
    gc.py         mark and sweep, hole punching, compaction
    verify.py     re-reading and re-hashing stored chunks
    intents.py    the audit entries committed operations owe (the index's half)

May import: hypersdk.protocol, hypersdk.node.errors / config / files. Not the network,
the audit log, the services or anything above (import-linter checks it).
"""

"""The node: store, chunker, backup/restore, CLI. The only package that does real I/O."""

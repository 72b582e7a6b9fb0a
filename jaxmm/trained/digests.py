"""Content digests of array pytrees: a SHA-256 per top-level entry (params, batch_stats, ...).

A checkpoint records the digest of what was saved; a restore recomputes it from the arrays it
read, so a changed byte in any array file is detected whatever orbax's on-disk format is. Each
leaf is hashed with its path, dtype and shape; leaves are ordered by path, so a tuple and a
dict with keys "0", "1", ... (how orbax may hand back optimizer states) give the same digest.
"""

import concurrent.futures
import hashlib
import os

import jax
import numpy as np

ALGORITHM = "sha256"


def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaf_digest(item: tuple) -> bytes:
    path, leaf = item
    array = np.ascontiguousarray(np.asarray(leaf))
    h = hashlib.sha256(f"{path}|{array.dtype.name}|{array.shape}|".encode())
    h.update(array.reshape(-1).view(np.uint8))  # hashlib releases the GIL on large buffers.
    return h.digest()


def _entry_digest(tree, pool: concurrent.futures.Executor) -> str:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    items = sorted((("/".join(_key_name(k) for k in path), leaf) for path, leaf in leaves),
                   key=lambda item: item[0])
    h = hashlib.sha256()
    for leaf_digest in pool.map(_leaf_digest, items):
        h.update(leaf_digest)
    return h.hexdigest()


def tree_digest(tree: dict) -> dict:
    """The JSON-ready digest {"algorithm": ..., "entries": {name: hex}} of a dict of pytrees."""
    workers = min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        entries = {name: _entry_digest(sub, pool) for name, sub in tree.items()}
    return {"algorithm": ALGORITHM, "entries": entries}


def mismatches(tree: dict, recorded: dict) -> list[str]:
    """The top-level entries of ``tree`` whose digest differs from ``recorded`` (or is absent).

    Entries of ``recorded`` that ``tree`` lacks (a partial restore) are not compared.
    """
    if recorded.get("algorithm") != ALGORITHM:
        return sorted(tree)
    actual = tree_digest(tree)["entries"]
    want = recorded.get("entries", {})
    return [name for name in sorted(actual) if want.get(name) != actual[name]]

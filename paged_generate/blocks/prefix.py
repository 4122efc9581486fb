"""Full blocks of prompts kept after their call, found again by their tokens: the prefix index of one block pool.

An entry is one cached block, keyed by (its parent's entry, the block's key): the key is the bytes of everything that
decides the block's K/V beside the blocks before it (its tokens, their mask bits and positions, see `block_keys`).
The dict hashes that pair and compares it exactly, so a block is only ever found by a prompt holding the same tokens
at the same place after the same earlier blocks: two prompts whose keys collide in the hash are still told apart.
Entry numbers are never reused, so an entry whose parent was evicted can never be reached again (it is dropped with
its parent).

Plain numpy and dicts, no tensors: the pool (`paged_generate/pool.py`) holds the K/V and the reference counts; the
index holds one reference to each cached block (see `cached_blocks`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["PrefixIndex", "block_keys"]

_ROOT = 0  # the parent entry of every prompt's first block


def block_keys(fields: np.ndarray, num_blocks: int, block_size: int) -> list[bytes]:
    """The keys of the first `num_blocks` blocks of one row: `fields` int64 [seq_len, num_fields] holds, per token,
    everything its K/V depend on beside the earlier tokens (token id, mask bit, position)."""
    fields = np.ascontiguousarray(fields[: num_blocks * block_size], dtype=np.int64)
    step = block_size * fields.shape[1] * fields.itemsize
    data = fields.tobytes()
    return [data[i * step : (i + 1) * step] for i in range(num_blocks)]


class PrefixIndex:
    """Cached full blocks by (parent entry, key); least-recently-used order for eviction.

    Blocks are the ids of one allocator; `last_used` and `depth` are per block id (numpy, grown on demand), so that
    the eviction order of thousands of blocks is one `lexsort`.

    Example
    -------
    >>> index = PrefixIndex()
    >>> keys = block_keys(np.stack([tokens, mask, positions], 1), 3, 16)
    >>> index.insert(keys, np.array([7, 8, 9]), stamp=1)  # newly cached: [7, 8, 9]
    >>> index.lookup(keys[:2] + [other_key])             # [7, 8]
    """

    def __init__(self):
        self._entries: dict[tuple[int, bytes], int] = {}  # (parent entry, key) -> entry
        self._block: dict[int, int] = {}  # entry -> block id
        self._parent_key: dict[int, tuple[int, bytes]] = {}  # entry -> its key in `_entries`
        self._children: dict[int, set[int]] = {}  # entry -> entries whose parent it is
        self._next_entry = _ROOT + 1
        self.entry_of = np.full(0, -1, dtype=np.int64)  # [block ids seen]: the block's entry, -1 when not cached
        self.last_used = np.zeros(0, dtype=np.int64)
        self.depth = np.zeros(0, dtype=np.int64)  # blocks before it in its prompt

    @property
    def num_cached(self) -> int:
        return len(self._block)

    def cached_blocks(self) -> np.ndarray:
        """int64 [num_cached], every cached block id."""
        return np.fromiter(self._block.values(), dtype=np.int64, count=len(self._block))

    def lookup(self, keys: list[bytes]) -> np.ndarray:
        """int64 [num_found]: the blocks of the longest cached chain of `keys` (one prompt's first blocks)."""
        found, parent = [], _ROOT
        for key in keys:
            entry = self._entries.get((parent, key))
            if entry is None:
                break
            found.append(self._block[entry])
            parent = entry
        return np.array(found, dtype=np.int64)

    def insert(self, keys: list[bytes], blocks: np.ndarray, stamp: int) -> np.ndarray:
        """Cache `blocks` [len(keys)], one prompt's first blocks holding `keys`. Blocks whose key is cached already
        (by this block or an equal one) are skipped; so is a block cached elsewhere. Returns the newly cached blocks
        (the caller adds the index's reference to each)."""
        added, parent = [], _ROOT
        for depth, (key, block) in enumerate(zip(keys, blocks.tolist())):
            entry = self._entries.get((parent, key))
            if entry is None:
                self._reach(block)
                if self.entry_of[block] >= 0:  # cached under another key: cannot hold these tokens too
                    break
                entry = self._next_entry
                self._next_entry += 1
                self._entries[(parent, key)] = entry
                self._block[entry] = block
                self._parent_key[entry] = (parent, key)
                self._children.setdefault(parent, set()).add(entry)
                self.entry_of[block] = entry
                self.depth[block] = depth
                added.append(block)
            self.last_used[self._block[entry]] = stamp
            parent = entry
        return np.array(added, dtype=np.int64)

    def touch(self, blocks: np.ndarray, stamp: int) -> None:
        """Mark cached `blocks` (any block ids) as used at `stamp`; blocks not cached are ignored."""
        if len(blocks):
            blocks = blocks[blocks < len(self.entry_of)]
            self.last_used[blocks[self.entry_of[blocks] >= 0]] = stamp

    def evictable(self, ref_counts: np.ndarray) -> np.ndarray:
        """int64: cached blocks no call references (the index's reference is their only one), least recently used
        first; of blocks used together, the deepest first (a prompt's last blocks go before its first)."""
        seen = min(len(self.entry_of), len(ref_counts))  # cached blocks are below both
        blocks = np.flatnonzero((self.entry_of[:seen] >= 0) & (ref_counts[:seen] == 1))
        return blocks[np.lexsort((-self.depth[blocks], self.last_used[blocks]))]

    def remove(self, blocks: np.ndarray) -> np.ndarray:
        """Forget cached `blocks` and every block cached after them in a prompt (unreachable without them). Returns
        all the blocks forgotten: the caller drops the index's reference to each."""
        removed = []
        pending = [int(self.entry_of[block]) for block in blocks.tolist() if self.entry_of[block] >= 0]
        while pending:
            entry = pending.pop()
            block = self._block.pop(entry, None)
            if block is None:  # already forgotten as a descendant of another
                continue
            removed.append(block)
            self.entry_of[block] = -1
            parent, key = self._parent_key.pop(entry)
            del self._entries[(parent, key)]
            siblings = self._children.get(parent)
            if siblings is not None:
                siblings.discard(entry)
            pending.extend(self._children.pop(entry, ()))
        return np.array(removed, dtype=np.int64)

    def clear(self) -> np.ndarray:
        """Forget every entry; returns the blocks that were cached."""
        blocks = self.cached_blocks()
        self.__init__()
        return blocks

    def _reach(self, block: int) -> None:
        if block >= len(self.entry_of):
            size = max(block + 1, 2 * len(self.entry_of))
            self.entry_of = np.concatenate([self.entry_of, np.full(size - len(self.entry_of), -1, dtype=np.int64)])
            self.last_used = np.concatenate([self.last_used, np.zeros(size - len(self.last_used), dtype=np.int64)])
            self.depth = np.concatenate([self.depth, np.zeros(size - len(self.depth), dtype=np.int64)])

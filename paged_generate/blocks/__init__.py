"""Block bookkeeping: which blocks each row holds, reference counts, copy-on-write, groups of rows sharing a prefix.

Plain numpy, no model and no attention code: everything above (the step, the cache, attention) builds on this.
"""

from .allocator import BlockAllocator, ByteCap
from .groups import SharedPrefix
from .partial import PartialBlocks, SlotPlan
from .sizes import MAX_BLOCK_SIZE, block_size_problem, cdiv
from .tables import BlockCopies, BlockTables

__all__ = ["BlockAllocator", "BlockCopies", "ByteCap", "BlockTables", "MAX_BLOCK_SIZE", "PartialBlocks", "SharedPrefix",
           "SlotPlan", "block_size_problem", "cdiv"]

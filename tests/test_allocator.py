"""The allocator and block tables on their own: counts, sharing, copy-on-write, freeing."""

import numpy as np
import pytest

from paged_generate import BlockAllocator, BlockTables, OutOfBlocksError
from paged_generate.step import PagedStep


def table_reference_counts(tables: BlockTables) -> np.ndarray:
    return np.bincount(tables.tables.ravel(), minlength=tables.allocator.capacity)


def assert_consistent(tables: BlockTables) -> None:
    allocator = tables.allocator
    np.testing.assert_array_equal(allocator.ref_counts, table_reference_counts(tables))
    free = allocator._free_stack[: allocator.num_free]
    assert len(set(free.tolist())) == len(free), "a block is on the free list twice"
    assert set(free.tolist()) == set(np.flatnonzero(allocator.ref_counts == 0).tolist())


def test_allocate_and_free_return_blocks():
    allocator = BlockAllocator(block_size=4)
    ids = allocator.allocate(5)
    assert sorted(ids.tolist()) == [0, 1, 2, 3, 4] and allocator.num_used == 5
    allocator.incref(ids[:2])
    allocator.decref(ids)
    assert allocator.num_used == 2
    allocator.decref(ids[:2])
    assert allocator.num_used == 0 and allocator.peak_used == 5


def test_cap_raises_before_changing_state():
    allocator = BlockAllocator(block_size=4, max_blocks=3)
    allocator.allocate(2)
    with pytest.raises(OutOfBlocksError, match="max_blocks=3"):
        allocator.allocate(2)
    assert allocator.num_used == 2


def test_fork_shares_without_allocating():
    tables = BlockTables(BlockAllocator(block_size=4), num_rows=2)
    tables.append(10)  # 3 blocks per row, last one partial
    used = tables.allocator.num_used
    tables.fork(3)
    assert tables.num_rows == 6 and tables.allocator.num_used == used
    assert_consistent(tables)


def test_append_copies_shared_partial_block_once_per_extra_holder():
    tables = BlockTables(BlockAllocator(block_size=4), num_rows=1)
    tables.append(6)  # blocks [a, b], b half full
    tables.fork(3)
    plan = tables.append(1)
    # The first row keeps the partial block; the two others write into copies of it.
    assert len(plan.copy_src) == 2 and set(plan.copy_src.tolist()) == {int(tables.tables[0, 1])}
    assert len(set(tables.tables[:, 1].tolist())) == 3
    np.testing.assert_array_equal(tables.tables[:, 0], tables.tables[0, 0])  # full block still shared
    assert_consistent(tables)


def test_no_copy_when_the_shared_block_is_full():
    tables = BlockTables(BlockAllocator(block_size=4), num_rows=1)
    tables.append(8)
    tables.fork(4)
    plan = tables.append(1)
    assert len(plan.copy_src) == 0
    assert tables.allocator.num_used == 2 + 4
    assert_consistent(tables)


def test_select_repeats_and_drops_rows():
    tables = BlockTables(BlockAllocator(block_size=4), num_rows=3)
    tables.append(5)
    tables.select(np.array([2, 2, 0]))
    assert_consistent(tables)
    assert tables.allocator.num_used == 4  # row 1's two blocks were freed
    tables.append(1)  # rows 0 and 1 share a partial block: one copy
    assert_consistent(tables)
    assert tables.allocator.num_used == 5


def test_slot_mapping_points_into_each_rows_blocks():
    tables = BlockTables(BlockAllocator(block_size=4), num_rows=2)
    copies = tables.append(6)
    step = PagedStep(past_len=0, query_len=6, block_size=4, tables=tables.tables, copies=copies,
                     pool_blocks=tables.allocator.capacity)
    for row in range(2):
        expected = [tables.tables[row, p // 4] * 4 + p % 4 for p in range(6)]
        assert step.slot_mapping[row].tolist() == expected


def test_crop_releases_emptied_blocks():
    tables = BlockTables(BlockAllocator(block_size=4), num_rows=2)
    tables.append(9)
    tables.crop(4)
    assert tables.seq_len == 4 and tables.tables.shape == (2, 1)
    assert_consistent(tables)
    tables.free()
    assert tables.allocator.num_used == 0


def test_append_fails_cleanly_at_the_cap():
    tables = BlockTables(BlockAllocator(block_size=4, max_blocks=4), num_rows=2)
    tables.append(6)
    before = tables.tables.copy()
    with pytest.raises(OutOfBlocksError):
        tables.append(4)
    np.testing.assert_array_equal(tables.tables, before)
    assert tables.seq_len == 6
    assert_consistent(tables)


def test_take_hands_out_exactly_the_ids_asked_for_or_nothing():
    allocator = BlockAllocator(block_size=4, max_blocks=40)
    held = allocator.allocate(3)  # 0, 1, 2
    assert not allocator.take(np.array([2, 3]))  # 2 is in use
    assert not allocator.take(np.array([5, 5]))  # repeated
    assert not allocator.take(np.array([39, 40]))  # past the cap
    assert allocator.num_used == 3 and allocator.capacity == 3
    assert allocator.take(np.array([4, 9]))  # grows the pool to reach 9 (geometrically, as allocate does)
    assert allocator.capacity == 10 and allocator.ref_counts[[4, 9]].tolist() == [1, 1]
    # The ids left free keep their order: lowest first.
    assert allocator.allocate(3).tolist() == [3, 5, 6] and allocator.next_id() == 7
    allocator.decref(held)
    assert allocator.num_used == 5


def test_rows_expected_to_grow_side_by_side_keep_runs_of_blocks():
    tables = BlockTables(BlockAllocator(block_size=4), num_rows=3, row_stride=3)
    tables.append(6)  # 2 blocks per row, rows 3 blocks apart
    assert tables.tables.tolist() == [[0, 1], [3, 4], [6, 7]]
    tables.append(6)  # 3rd block of each row: the one after its last
    assert tables.tables.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    tables.append(1)  # the runs are used up: blocks come from the allocator in its order
    assert tables.tables[:, 3].tolist() == [9, 10, 11]
    assert_consistent(tables)
    tables.free()
    assert tables.allocator.num_used == 0

"""The CUDA launch tables, built by host C++ and decoded by the chunk search the kernels run (csrc/common/launch.h).
These run on the CPU: they cover every boundary of the builder without a GPU."""
import pytest

import gradclip_cuda as gc
from gradclip_cuda import _ops

pytestmark = pytest.mark.skipif(_ops.C is None, reason="needs the compiled library")

F32, F16, BF16, F64 = 0, 1, 2, 3


def tables(numels, dtypes=None, skip=None, chunk=None, capacity=None):
    C = _ops.C
    dtypes = dtypes or [F32] * len(numels)
    return C.launch_tables(numels, dtypes, skip or [0] * len(numels), chunk or C.CUDA_CHUNK,
                           capacity or C.TABLE_SLOTS[1])


def check_cover(launches, numels, dtypes, chunk, capacity, skip=None):
    """Every element of every tensor lies in exactly one chunk, chunks are in tensor order, no chunk is larger than
    `chunk`, tables hold at most `capacity` tensors and split on tensor boundaries, chunk bases run on."""
    seen = {}
    plan_chunks = 0
    tensor_next = 0
    for i, l in enumerate(launches):
        assert l["chunk_base"] == plan_chunks and l["tensor_base"] == tensor_next
        assert 1 <= l["n_tensors"] <= capacity or (len(numels) == 0)
        assert l["n_chunks"] == len(l["chunks"]) and l["last"] == (i == len(launches) - 1)
        for t, begin, size, dtype, sk in l["chunks"]:
            assert l["tensor_base"] <= t < l["tensor_base"] + l["n_tensors"]
            assert dtype == dtypes[t] and sk == bool(skip and skip[t])
            assert 1 <= size <= chunk and begin % chunk == 0
            assert seen.get(t, 0) == begin, "chunks of a tensor are consecutive and in order"
            seen[t] = begin + size
        plan_chunks += l["n_chunks"]
        tensor_next += l["n_tensors"]
    assert tensor_next == len(numels)
    assert all(seen.get(t, 0) == n for t, n in enumerate(numels))
    assert plan_chunks == sum(-(-n // chunk) for n in numels)


def test_small_mixed_set_fits_one_launch():
    numels = [3, 0, 70_000, 5, 65_536, 1]
    dtypes = [F32, F16, BF16, F64, F16, F32]
    launches = tables(numels, dtypes, chunk=65_536, capacity=64)
    assert len(launches) == 1
    check_cover(launches, numels, dtypes, 65_536, 64)


@pytest.mark.parametrize("capacity", [1, 2, 64, 2016])
def test_more_tensors_than_a_table_holds_spill_into_more_launches(capacity):
    numels = [(i * 7919) % 300 for i in range(2_100)]  # with empties
    dtypes = [i % 4 for i in range(len(numels))]
    launches = tables(numels, dtypes, chunk=128, capacity=capacity)
    assert len(launches) == -(-len(numels) // capacity)
    check_cover(launches, numels, dtypes, 128, capacity)


def test_two_thousand_tensors_take_one_launch_with_the_large_table():
    small, large = _ops.C.TABLE_SLOTS
    assert large >= 2_000
    numels = [256] * 2_000
    assert len(tables(numels, capacity=large)) == 1
    assert len(tables(numels, capacity=small)) == -(-2_000 // small)


def test_tensor_above_2_pow_31_elements_keeps_64_bit_offsets():
    numels = [5, 2**31 + 3, 7]
    launches = tables(numels, chunk=2**20, capacity=64)
    check_cover(launches, numels, [F32] * 3, 2**20, 64)
    last_chunk_of_big = [c for c in launches[0]["chunks"] if c[0] == 1][-1]
    assert last_chunk_of_big[1] == 2**31 and last_chunk_of_big[2] == 3


def test_empty_tensors_own_no_chunk_anywhere():
    numels = [0, 0, 4, 0, 0, 9, 0]
    launches = tables(numels, chunk=4, capacity=3)
    check_cover(launches, numels, [F32] * 7, 4, 3)
    assert [c[0] for l in launches for c in l["chunks"]] == [2, 5, 5, 5]
    only_empty = tables([0, 0], chunk=4, capacity=64)
    assert len(only_empty) == 1 and only_empty[0]["n_chunks"] == 0 and only_empty[0]["last"]


def test_skip_flags_travel_with_their_tensor():
    numels, skip = [10, 10, 10], [0, 1, 0]
    launches = tables(numels, skip=skip, chunk=4, capacity=2)
    check_cover(launches, numels, [F32] * 3, 4, 2, skip)


def test_sizes_the_kernels_cannot_take_raise():
    with pytest.raises(RuntimeError, match="2\\^40"):
        tables([2**40])
    with pytest.raises(RuntimeError, match="more chunks than one launch holds"):
        tables([2**24 + 1], chunk=1)


def test_chunk_constant_is_what_the_python_side_reports():
    assert _ops.C.CUDA_CHUNK == 65_536 and gc.build_info()["compiled"]

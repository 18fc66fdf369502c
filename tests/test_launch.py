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


def expected_packs(numels, chunk, capacity):
    """The packs, as the builder forms them over the whole list: runs of consecutive small tensors (1 .. chunk / 16
    elements), at most min(16, capacity) to a pack."""
    small_max = chunk // _ops.C.PACK_TENSORS
    cap = min(_ops.C.PACK_TENSORS, capacity)
    packs = []
    for t, n in enumerate(numels):
        if 0 < n <= small_max:
            if packs and packs[-1][-1] == t - 1 and len(packs[-1]) < cap:
                packs[-1].append(t)
            else:
                packs.append([t])
    return packs


def expected_launch_sizes(numels, chunk, capacity):
    """Tensors per launch: up to `capacity`, cut only between packs (a pack goes whole into the launch of its
    first member)."""
    packs = expected_packs(numels, chunk, capacity)
    opens = {p[0]: len(p) for p in packs}
    joins = {t for p in packs for t in p[1:]}
    sizes = [0]
    for t in range(len(numels)):
        if t not in joins and sizes[-1] and sizes[-1] + opens.get(t, 1) > capacity:
            sizes.append(0)
        sizes[-1] += 1
    return sizes


def check_cover(launches, numels, dtypes, chunk, capacity, skip=None):
    """Every element of every tensor lies in exactly one piece of one chunk. A chunk is one piece of a larger tensor
    (a tensor's chunks consecutive and in order, at most `chunk` elements, starting at multiples of it) or a pack
    (consecutive small tensors, each whole, listed last first, exactly the packs of expected_packs, with plan-wide
    chunk indices). Tables hold at most `capacity` tensors and split where expected_launch_sizes says; chunk bases run
    on."""
    small_max = chunk // _ops.C.PACK_TENSORS
    seen = {}
    plan_chunks = 0
    tensor_next = 0
    packs = []
    for i, l in enumerate(launches):
        assert l["chunk_base"] == plan_chunks and l["tensor_base"] == tensor_next
        assert 1 <= l["n_tensors"] <= capacity or (len(numels) == 0)
        assert l["last"] == (i == len(launches) - 1)
        by_k = {}
        for k, t, begin, size, dtype, sk in l["chunks"]:
            by_k.setdefault(k, []).append((t, begin, size))
            assert l["tensor_base"] <= t < l["tensor_base"] + l["n_tensors"]
            assert dtype == dtypes[t] and sk == bool(skip and skip[t])
            assert seen.get(t, 0) == begin, "chunks of a tensor are consecutive and in order"
            seen[t] = begin + size
        assert sorted(by_k) == list(range(l["n_chunks"]))
        for k, pieces in sorted(by_k.items()):
            if numels[pieces[0][0]] > small_max:
                assert len(pieces) == 1
                t, begin, size = pieces[0]
                assert 1 <= size <= chunk and begin % chunk == 0
            else:
                ts = [p[0] for p in pieces]
                assert ts == list(range(ts[0], ts[0] - len(ts), -1)), "a pack: consecutive tensors, last first"
                assert all(begin == 0 and size == numels[t] for t, begin, size in pieces)
                packs.append(sorted(ts))
        plan_chunks += l["n_chunks"]
        tensor_next += l["n_tensors"]
    assert tensor_next == len(numels)
    assert all(seen.get(t, 0) == n for t, n in enumerate(numels))
    assert packs == expected_packs(numels, chunk, capacity)
    big = sum(-(-n // chunk) for n in numels if n > small_max)
    assert plan_chunks == big + len(packs)
    if numels:
        assert [l["n_tensors"] for l in launches] == expected_launch_sizes(numels, chunk, capacity)


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
    assert len(launches) >= -(-len(numels) // capacity)
    check_cover(launches, numels, dtypes, 128, capacity)


def test_two_thousand_tensors_take_one_launch_with_the_large_table():
    small, large = _ops.C.TABLE_SLOTS
    assert large >= 2_000 and small % _ops.C.PACK_TENSORS == 0 and large % _ops.C.PACK_TENSORS == 0
    numels = [256] * 2_000
    assert len(tables(numels, capacity=large)) == 1
    assert len(tables(numels, capacity=small)) == -(-2_000 // small)


def test_tensor_above_2_pow_31_elements_keeps_64_bit_offsets():
    numels = [5, 2**31 + 3, 7]
    launches = tables(numels, chunk=2**20, capacity=64)
    check_cover(launches, numels, [F32] * 3, 2**20, 64)
    last_chunk_of_big = [c for c in launches[0]["chunks"] if c[1] == 1][-1]
    assert last_chunk_of_big[2] == 2**31 and last_chunk_of_big[3] == 3


def test_empty_tensors_own_no_chunk_anywhere():
    numels = [0, 0, 4, 0, 0, 9, 0]
    launches = tables(numels, chunk=4, capacity=3)
    check_cover(launches, numels, [F32] * 7, 4, 3)
    assert [c[1] for l in launches for c in l["chunks"]] == [2, 5, 5, 5]
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


def test_small_tensors_are_packed_sixteen_to_a_chunk():
    # 5,000 tensors of 256 elements: 313 chunks (blocks of 16 busy warps), not 5,000 blocks of one busy warp each.
    small, large = _ops.C.TABLE_SLOTS
    numels = [256] * 5_000
    launches = tables(numels, capacity=large)
    check_cover(launches, numels, [F32] * 5_000, _ops.C.CUDA_CHUNK, large)
    assert [l["n_tensors"] for l in launches] == [2_016, 2_016, 968]
    assert [l["n_chunks"] for l in launches] == [126, 126, 61]
    assert sum(len(l["chunks"]) for l in launches) == 5_000


@pytest.mark.parametrize("seed", range(3))
def test_packs_and_their_chunk_indices_do_not_depend_on_the_table_capacity(seed):
    import random
    rng = random.Random(seed)
    numels = [rng.choice([0, 1, 7, 256, 4096, 4097, 70_000, 200_000]) for _ in range(3_000)]
    dtypes = [rng.randrange(4) for _ in numels]
    where = []
    for capacity in _ops.C.TABLE_SLOTS:
        launches = tables(numels, dtypes, capacity=capacity)
        check_cover(launches, numels, dtypes, _ops.C.CUDA_CHUNK, capacity)
        # plan-wide chunk index of every piece: where its partial lands, whatever the split
        where.append(sorted((l["chunk_base"] + c[0], c[1], c[2]) for l in launches for c in l["chunks"]))
    assert where[0] == where[1]


def test_chunk_constant_is_what_the_python_side_reports():
    assert _ops.C.CUDA_CHUNK == 65_536 and gc.build_info()["compiled"]

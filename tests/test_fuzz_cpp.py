"""Fuzzing of the C++ kernels' input parsing (issue 21, "Memory safety of the C++ kernels").

Two inputs the C++ code parses itself, rather than reading as plain numbers:

- group ids (string uids, bytes, integers) hashed into dense group numbers by
  ``cpp_group_index`` / ``cpp_group_index_joined`` (csrc/advantages.cpp, called from
  rlkern/ops/advantages/groups.py): equal ids must always get the same group and different ids
  different groups, whatever the strings hold ("\\0", non-ASCII, lone surrogates, empty), and
  also when two different keys have the same 64-bit hash (crafted below: the hash is a chain of
  invertible steps, so colliding keys are built directly, not searched for);
- tree structure (``parent`` arrays) validated by csrc/trees.cpp: cycles, self-loops,
  out-of-range parents (down to INT64_MIN), no root, several roots, empty, chains thousands of
  levels deep. A bad array must raise the reference's ValueError (rlkern/reference/trees.py,
  same message, same node), never crash, hang or read out of bounds; a good one must give the
  reference's values and advantages.

No libFuzzer (no clang) or atheris wheel on the build machine: hypothesis drives the inputs.
Profiles: "ci" (default) is derandomized and bounded; ``RLKERN_FUZZ=long`` draws fresh random
examples, ``RLKERN_FUZZ_EXAMPLES`` per test (default 3000), with larger forests: run by hand
under the ASan/UBSan build (benches/sanitize_cpu.sh --fuzz), summary in
benches/results/cpu/fuzz-cpp.md.
"""

import os
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import rlkern
from rlkern import _backend
from rlkern.ops.advantages import groups
from rlkern.reference import trees as R

LONG = os.environ.get("RLKERN_FUZZ") == "long"
_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
settings.register_profile("rlkern-fuzz-cpp-ci", derandomize=True, **_COMMON)
settings.register_profile("rlkern-fuzz-cpp-long", derandomize=False, **_COMMON)
PROFILE = settings.get_profile("rlkern-fuzz-cpp-long" if LONG else "rlkern-fuzz-cpp-ci")
LONG_EXAMPLES = int(os.environ.get("RLKERN_FUZZ_EXAMPLES", "3000"))


def _fuzz(ci, long_share=1.0):
    """ci examples in CI; long_share * RLKERN_FUZZ_EXAMPLES in the long profile."""
    return settings(PROFILE, max_examples=max(ci, int(LONG_EXAMPLES * long_share)) if LONG else ci)


def _big(ci, long):
    return long if LONG else ci


@pytest.fixture(autouse=True)
def _cpp(monkeypatch):
    """Every test here fuzzes the C++ kernels: fail (not skip) without them."""
    if not _backend.has_cpp():
        pytest.fail("rlkern._C did not build")
    monkeypatch.setenv("RLKERN_BACKEND", "cpp")


def _canon(values) -> list[int]:
    """First-occurrence labels: two labelings are the same partition iff their _canon agree."""
    first: dict = {}
    return [first.setdefault(v, len(first)) for v in values]


def _assert_partition(out: torch.Tensor, keys) -> None:
    keys = list(keys)
    assert out.dtype == torch.int64 and tuple(out.shape) == (len(keys),)
    got = out.tolist()
    assert all(0 <= g < len(keys) for g in got)
    assert _canon(got) == _canon(keys)


# ---------------------------------------------------------------------------------------------
# Group ids

# Small pools make duplicates (the groups) frequent; the characters cover ASCII, "\0" anywhere,
# other control characters, BMP and astral code points, and lone surrogates (UTF-32 with
# surrogatepass in groups.py).
_CHARS = st.one_of(
    st.characters(min_codepoint=1, max_codepoint=127),
    st.sampled_from(["\0", "\x01", "\x7f", "\x80", "\xff", "\u0100", "\ud800", "\udfff", "\uffff",
                     "\U0001f600", "\U0010ffff"]),
    st.characters(),
)
_TEXT = st.text(_CHARS, max_size=_big(24, 80))
_ASCII = st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=_big(24, 80))


@st.composite
def _id_lists(draw, element):
    pool = draw(st.lists(element, min_size=1, max_size=_big(12, 60)))
    n = draw(st.integers(0, _big(80, 2000)))
    layout = draw(st.sampled_from(["random", "grouped"]))
    picks = draw(st.lists(st.integers(0, len(pool) - 1), min_size=n, max_size=n))
    if layout == "grouped":  # GRPO batches keep a group's samples together (the kernel's fast path)
        picks.sort()
    return [pool[k] for k in picks]


@_fuzz(150)
@given(ids=_id_lists(st.one_of(_TEXT, _ASCII)), form=st.sampled_from(["list", "tuple", "object", "unicode"]))
def test_group_index_strings_fuzz(ids, form):
    if form == "list":
        arg, keys = ids, ids
    elif form == "tuple":
        arg, keys = tuple(ids), ids
    elif form == "object":
        arg = np.array(ids + [None], dtype=object)[:-1]  # the None keeps numpy from making '<U'
        keys = ids
    else:
        arg = np.array(ids, dtype=str) if ids else np.zeros(0, dtype="<U1")
        keys = arg.tolist()  # numpy's own equality: trailing "\0" dropped
    out = rlkern.group_index(arg)
    _assert_partition(out, keys)


@_fuzz(80)
@given(ids=_id_lists(st.binary(max_size=_big(24, 80))))
def test_group_index_bytes_fuzz(ids):
    arr = np.array(ids, dtype=bytes) if ids else np.zeros(0, dtype="S1")
    _assert_partition(rlkern.group_index(arr), arr.tolist())


_INT64 = st.one_of(st.integers(-(2 ** 63), 2 ** 63 - 1), st.sampled_from([0, -1, 1, 2 ** 63 - 1, -(2 ** 63)]))


@_fuzz(80)
@given(ids=_id_lists(_INT64), form=st.sampled_from(["list", "tensor", "numpy", "int32"]))
def test_group_index_ints_fuzz(ids, form):
    if form == "list":
        out = rlkern.group_index(ids)
    elif form == "tensor":
        out = rlkern.group_index(torch.tensor(ids, dtype=torch.int64))
    elif form == "numpy":
        out = rlkern.group_index(np.array(ids, dtype=np.int64))
    else:
        ids = [x % (2 ** 32) - 2 ** 31 for x in ids]
        out = rlkern.group_index(torch.tensor(ids, dtype=torch.int32))
    _assert_partition(out, ids)


# The C++ ops themselves, past the Python layer: any offsets / counts, valid or not, must give
# the right groups or raise; never crash or read out of bounds (the ASan run checks the latter).

@_fuzz(150)
@given(data=st.data(), dtype=st.sampled_from([torch.uint8, torch.int32, torch.int64]))
def test_cpp_group_index_ragged_fuzz(data, dtype):
    total = data.draw(st.integers(0, 40))
    hi = 3 if dtype == torch.uint8 else 2 ** 31 - 1
    keys = torch.tensor(data.draw(st.lists(st.integers(0, hi), min_size=total, max_size=total)), dtype=dtype)
    n = data.draw(st.integers(0, 12))
    cuts = sorted(data.draw(st.lists(st.integers(0, total), min_size=n, max_size=n)))
    offsets = [0] + cuts[:-1] + [total] if n else [0]
    if n and data.draw(st.booleans()):  # break them
        k = data.draw(st.integers(0, len(offsets) - 1))
        offsets[k] = data.draw(st.sampled_from([-1, total + 1, -(2 ** 63), 2 ** 63 - 1, offsets[k] + 3]))
    valid = offsets[0] == 0 and offsets[-1] == total and all(a <= b for a, b in zip(offsets, offsets[1:]))
    off = torch.tensor(offsets, dtype=torch.int64)
    if not valid:
        with pytest.raises(RuntimeError, match="cpp_group_index: offsets"):
            torch.ops.rlkern.cpp_group_index(keys, off)
        return
    out = torch.ops.rlkern.cpp_group_index(keys, off)
    rows = [tuple(keys[a:b].tolist()) for a, b in zip(offsets, offsets[1:])]
    _assert_partition(out, rows)


@_fuzz(100)
@given(data=st.data(), dtype=st.sampled_from([torch.uint8, torch.int32, torch.int64]),
       n=st.integers(0, 30), width=st.integers(0, 5))
def test_cpp_group_index_fixed_width_fuzz(data, dtype, n, width):
    """[N, W] rows (numpy '<U' code points, 'S' bytes), W = 0 included: empty keys, null data."""
    values = data.draw(st.lists(st.integers(0, 2), min_size=n * width, max_size=n * width))
    keys = torch.tensor(values, dtype=dtype).reshape(n, width)
    _assert_partition(torch.ops.rlkern.cpp_group_index(keys, None), [tuple(r) for r in keys.tolist()])


@_fuzz(150)
@given(data=st.data(), dtype=st.sampled_from([torch.uint8, torch.int32]))
def test_cpp_group_index_joined_fuzz(data, dtype):
    total = data.draw(st.integers(0, 40))
    keys = data.draw(st.lists(st.integers(0, 3), min_size=total, max_size=total))
    zeros = keys.count(0)
    n = data.draw(st.one_of(st.just(zeros + 1), st.integers(-3, total + 3),
                            st.sampled_from([2 ** 40, 2 ** 62, 2 ** 63 - 1])))
    joined = torch.tensor(keys, dtype=dtype)
    if n < 0:
        with pytest.raises(RuntimeError, match="n must be >= 0"):
            torch.ops.rlkern.cpp_group_index_joined(joined, n)
        return
    if n != zeros + 1 and not (n == 0 and total == 0):
        with pytest.raises(ValueError, match="cpp_group_index_joined: "):
            torch.ops.rlkern.cpp_group_index_joined(joined, n)
        return
    out = torch.ops.rlkern.cpp_group_index_joined(joined, n)
    rows, cur = [], []
    for x in keys:
        if x == 0:
            rows.append(tuple(cur))
            cur = []
        else:
            cur.append(x)
    rows = rows + [tuple(cur)] if n else []
    _assert_partition(out, rows)


def test_group_index_empty_keys():
    """Empty keys, several of them, in an empty tensor (its data pointer may be null): equal.
    Regression: the key comparison called memcmp(null, null, 0) and the split of an empty joined
    buffer memchr(null, 0, 0), undefined behaviour that UBSan reported (benches/sanitize_cpu.sh);
    now nothing is read for length 0."""
    three_empty = torch.zeros(0, dtype=torch.int32)
    _assert_partition(torch.ops.rlkern.cpp_group_index(three_empty, torch.zeros(4, dtype=torch.int64)), [(), (), ()])
    _assert_partition(torch.ops.rlkern.cpp_group_index(torch.zeros(3, 0, dtype=torch.int64), None), [(), (), ()])
    _assert_partition(torch.ops.rlkern.cpp_group_index_joined(torch.zeros(2, dtype=torch.uint8), 3), ["", "", ""])
    _assert_partition(rlkern.group_index(["", "", "x", ""]), ["", "", "x", ""])
    _assert_partition(torch.ops.rlkern.cpp_group_index_joined(torch.zeros(0, dtype=torch.uint8), 1), [""])
    _assert_partition(rlkern.group_index([""]), [""])


# Hash collisions. csrc/advantages.cpp's hash_bytes: h = C ^ nbytes, then per 8-byte word w
# h = ((h ^ w) * P) mod 2^64, h ^= h >> 29, and a final avalanche. After the first word the
# states of two keys differ by d; choosing the second words w2' = w2 ^ d makes the states equal,
# so the two (different) 16-byte keys have the same hash. (Checked once by hand against the C++
# function compiled alone; if the C++ hash changes, these keys stop colliding but the test still
# checks the partition.)
_M64 = (1 << 64) - 1


def _state1(word: int, nbytes: int) -> int:
    h = ((((0x9E3779B97F4A7C15 ^ nbytes) ^ word) * 0x100000001B3) & _M64)
    return h ^ (h >> 29)


def _signed(x: int, bits: int) -> int:
    x &= (1 << bits) - 1
    return x - (1 << bits) if x >> (bits - 1) else x


def _colliding_int64(rng):
    a0, a1, b0 = (rng.getrandbits(64) for _ in range(3))
    b1 = a1 ^ _state1(a0, 16) ^ _state1(b0, 16)
    return [_signed(v, 64) for v in (a0, a1)], [_signed(v, 64) for v in (b0, b1)]


def _colliding_int32(rng):
    a = [rng.getrandbits(32) for _ in range(4)]
    b01 = [rng.getrandbits(32) for _ in range(2)]
    wa0, wa1 = a[0] | a[1] << 32, a[2] | a[3] << 32
    wb0 = b01[0] | b01[1] << 32
    wb1 = wa1 ^ _state1(wa0, 16) ^ _state1(wb0, 16)
    b = b01 + [wb1 & 0xFFFFFFFF, wb1 >> 32]
    return [_signed(v, 32) for v in a], [_signed(v, 32) for v in b]


def _ascii_word(s: str) -> int:
    return int.from_bytes(s.encode("ascii"), "little")


def _colliding_ascii(rng):
    """Two 16-character ASCII strings (no "\\0") with equal C++ hashes: first halves whose states
    differ only in the low 7 bits of every byte, then second halves differing by that."""
    seen: dict[int, str] = {}
    while True:
        first = "".join(chr(rng.randint(1, 127)) for _ in range(8))
        s = _state1(_ascii_word(first), 16)
        for t, other in seen.items():
            d = s ^ t
            if all((d >> (8 * k)) & 0x80 == 0 for k in range(8)) and first != other:
                dbytes = d.to_bytes(8, "little")
                tail = bytes(next(c for c in range(1, 128) if c != db) for db in dbytes)
                tail2 = bytes(c ^ db for c, db in zip(tail, dbytes))
                return first + tail.decode("ascii"), other + tail2.decode("ascii")
        seen[s] = first


@_fuzz(60)
@given(seed=st.integers(0, 2 ** 32 - 1), pairs=st.integers(1, 4), n=st.integers(2, 60),
       form=st.sampled_from(["int64", "int32", "ragged", "ascii"]))
def test_group_index_hash_collisions(seed, pairs, n, form):
    rng = random.Random(seed)
    make = {"int64": _colliding_int64, "int32": _colliding_int32, "ragged": _colliding_int32,
            "ascii": _colliding_ascii}[form]
    pool = []
    for _ in range(pairs):
        a, b = make(rng)
        assert a != b
        pool += [a, b]
    # adjacent colliding keys (the previous-key fast path) and keys spread out (the table)
    picks = [k for k in range(len(pool))] + [rng.randrange(len(pool)) for _ in range(n)]
    if rng.random() < 0.5:
        rng.shuffle(picks)
    rows = [pool[k] for k in picks]
    if form == "ascii":
        out = rlkern.group_index(rows)
    elif form == "ragged":  # the form groups.py uses for strings holding "\0"
        flat = torch.tensor([x for r in rows for x in r], dtype=torch.int32)
        off = torch.tensor([4 * i for i in range(len(rows) + 1)], dtype=torch.int64)
        out = torch.ops.rlkern.cpp_group_index(flat, off)
    else:
        dtype = torch.int64 if form == "int64" else torch.int32
        out = torch.ops.rlkern.cpp_group_index(torch.tensor(rows, dtype=dtype), None)
    _assert_partition(out, [tuple(r) if isinstance(r, list) else r for r in rows])


def test_colliding_ascii_keys_are_ascii_and_distinct():
    a, b = _colliding_ascii(random.Random(0))
    assert a != b and len(a) == len(b) == 16 and a.isascii() and "\0" not in a + b
    assert _state1(_ascii_word(a[:8]), 16) ^ _ascii_word(a[8:]) == _state1(_ascii_word(b[:8]), 16) ^ _ascii_word(b[8:])


# ---------------------------------------------------------------------------------------------
# Tree structure

_BAD_PARENTS = [-2, -3, -(2 ** 31), 2 ** 31 - 1, 2 ** 31, -(2 ** 63), 2 ** 63 - 1]


@st.composite
def _parents(draw, max_m):
    """A forest in random node order, then (often) broken: self-loops, edges to any node (cycles),
    parents out of range, roots removed, extra roots."""
    m = draw(st.integers(0, max_m))
    order = draw(st.permutations(range(m)))
    shape = draw(st.sampled_from(["random", "chain", "star", "binary"]))
    par_by_rank = []
    for r in range(m):
        if r == 0 or (shape == "random" and draw(st.integers(0, 9)) == 0):
            par_by_rank.append(-1)
        elif shape == "random":
            par_by_rank.append(draw(st.integers(0, r - 1)))
        else:
            par_by_rank.append({"chain": r - 1, "star": 0, "binary": (r - 1) // 2}[shape])
    parent = [0] * m
    for r, p in enumerate(par_by_rank):
        parent[order[r]] = -1 if p < 0 else order[p]
    edits = draw(st.integers(0, 3)) if m else 0
    for _ in range(edits):
        i = draw(st.integers(0, m - 1))
        parent[i] = draw(st.one_of(st.just(i), st.integers(0, m - 1), st.just(-1), st.just(m),
                                   st.sampled_from(_BAD_PARENTS)))
    if m and draw(st.integers(0, 7)) == 0:  # no root at all
        parent = [p if p != -1 else (i + 1) % m for i, p in enumerate(parent)]
    return parent


def _expect_error(par, max_depth):
    """The reference's ValueError message for a bad forest (or a too deep one), else None."""
    try:
        R.check_forest(par)
        if max_depth is not None:
            R.check_depth(par, max_depth)
    except ValueError as error:
        return str(error)
    return None


def _kind(message):
    """The class of a parent array, for hypothesis' statistics (and the long run's summary)."""
    if message is None:
        return "valid forest"
    for key, kind in (("out of range", "parent out of range"), ("no root", "no root"),
                      ("cycle", "cycle"), ("max_depth", "deeper than max_depth")):
        if key in message:
            return kind
    raise AssertionError(message)


def _close(ours, ref):
    # float64 in and out; TreePO's whitening divides rounding differences by a std that can be ~0
    torch.testing.assert_close(ours.double(), ref.double(), rtol=1e-7, atol=1e-7, equal_nan=True)


@_fuzz(300)
@given(par=_parents(_big(40, 200)), data=st.data())
def test_tree_structure_fuzz(par, data):
    m = len(par)
    reward = torch.tensor(data.draw(st.lists(st.floats(-4, 4, allow_nan=False, width=32), min_size=m, max_size=m)),
                          dtype=torch.float64)
    max_depth = data.draw(st.one_of(st.none(), st.integers(0, 6)))
    parent = torch.tensor(par, dtype=torch.int64)
    if min(par, default=0) >= -(2 ** 31) and max(par, default=0) < 2 ** 31 and data.draw(st.booleans()):
        parent = parent.to(torch.int32)  # converted by the op layer
    method = data.draw(st.sampled_from(["spo_rloo", "spo_grpo", "treerl", "treepo", "arpo"]))
    mode = data.draw(st.sampled_from(["mean_children", "mean_leaves"]))
    message = _expect_error(par, max_depth)
    event(_kind(message))
    if message is not None:
        with pytest.raises(ValueError) as error:
            rlkern.tree_values(parent, reward, mode=mode, max_depth=max_depth)
        assert message in str(error.value)
        with pytest.raises(ValueError) as error:
            rlkern.tree_advantages(parent, reward, method=method, max_depth=max_depth)
        assert message in str(error.value)
        with pytest.raises(ValueError) as error:  # the kernel itself, past the op layer
            torch.ops.rlkern.cpp_tree_values(parent.to(torch.int64), reward, 0, -1 if max_depth is None else max_depth)
        assert message in str(error.value)
        return
    _close(rlkern.tree_values(parent, reward, mode=mode, max_depth=max_depth),
           R.tree_values(parent.to(torch.int64), reward, mode))
    ours = rlkern.tree_advantages(parent, reward, method=method, return_values=True, max_depth=max_depth)
    adv, keep, values = R.tree_advantages(parent.to(torch.int64), reward, method, return_values=True)
    _close(ours.advantages, adv)
    assert torch.equal(ours.keep, keep)
    _close(ours.values, values)


@_fuzz(20, long_share=0.05)  # up to 300000 nodes: seconds per example in the long profile
@given(seed=st.integers(0, 2 ** 32 - 1), m=st.integers(2, _big(30000, 300000)),
       kind=st.sampled_from(["chain", "chain_depth", "cycle", "lasso"]))
def test_tree_deep_structure_fuzz(seed, m, kind):
    """Chains thousands of levels deep (the reference recurses, so the oracle here is direct),
    and cycles / lassos as long as the forest."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(m, generator=g)
    parent = torch.empty(m, dtype=torch.int64)
    parent[perm[0]] = -1
    parent[perm[1:]] = perm[:-1]  # node perm[k]'s parent is perm[k - 1]: depth k
    reward = torch.rand(m, generator=g, dtype=torch.float64)
    leaf = int(perm[-1])
    if kind == "chain":
        v = rlkern.tree_values(parent, reward, mode="mean_children")
        assert torch.equal(v, torch.full((m,), float(reward[leaf]), dtype=torch.float64))
        out = rlkern.tree_advantages(parent, reward, method="spo_rloo")
        assert torch.equal(out.advantages, torch.zeros(m, dtype=torch.float64)) and not out.keep.any()
        return
    if kind == "chain_depth":
        with pytest.raises(ValueError, match=f"max_depth={m - 2} but node {leaf} is at depth {m - 1}$"):
            rlkern.tree_values(parent, reward, max_depth=m - 2)
        return
    # cycle: the chain's head points back at its tail (no root); lasso: a root elsewhere, and
    # the cycle closes half-way down the chain, so the smallest node on it is reported
    cut = 0 if kind == "cycle" else m // 2
    parent[perm[cut]] = perm[-1]
    message = _expect_error(parent.tolist(), None)
    assert message is not None
    with pytest.raises(ValueError) as error:
        rlkern.tree_advantages(parent, reward, method="treepo")
    assert message in str(error.value)


def test_tree_multi_part_structure():
    """Forests past 2 * 4096 nodes split the children count across threads (csrc/trees.cpp
    build_order's parts): run them with two threads, with a bad parent in the second part."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        m = 3 * 4096 + 5
        parent = torch.randint(0, m, (m,), generator=g)
        parent = torch.minimum(parent, torch.arange(m) - 1)  # parent < node: a forest, root 0
        parent[torch.randperm(m, generator=g)[:7]] = -1
        parent[0] = -1
        reward = torch.rand(m, generator=g, dtype=torch.float64)
        _close(rlkern.tree_values(parent, reward), R.tree_values(parent, reward, "mean_children"))
        for bad, node in ((m, m - 3), (-2, 2 * 4096 + 1), (2 * 4096 + 7, 2 * 4096 + 7)):
            broken = parent.clone()
            broken[node] = bad
            with pytest.raises(ValueError) as error:
                rlkern.tree_values(broken, reward)
            assert _expect_error(broken.tolist(), None) in str(error.value)
    finally:
        torch.set_num_threads(threads)

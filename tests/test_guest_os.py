"""The guest model: free pool, page cache with refaults, anonymous pages, the balloon's pages.

Pure bookkeeping first (``GuestOS``), then the access streams of phases with a page cache,
then real vCPUs running such phases over the fake daemon of ``guest_rig.py``: refaults are
counted and stall the guest, every cached block's content is written and every read of it
checked.
"""

from __future__ import annotations

import numpy as np
import pytest
import xxhash
from pydantic import ValidationError

from shared.workload import Phase
from vmm_agent.access import CHUNK, AccessStream, cache_blocks
from vmm_agent.guest_os import ANON, BALLOON, CACHE, FREE, GuestOS

from .guest_rig import Rig


def never(_page: int) -> bool:
    return False


def kinds(os: GuestOS, pages: list[int]) -> list[int]:
    return [int(k) for k in os.kind[pages]]


# ---- phases and access streams ---------------------------------------------------------------


def test_phase_defaults_have_no_page_cache_and_cache_reads_need_one() -> None:
    phase = Phase()
    assert (phase.cache, phase.cache_ratio) == (0.0, 0.0)
    with pytest.raises(ValidationError, match="needs a page cache"):
        Phase(cache_ratio=0.5)
    with pytest.raises(ValidationError):
        Phase(cache=1.5)
    assert Phase(cache=0.4, cache_ratio=0.5, refault_ms=3).refault_ms == 3


@pytest.mark.parametrize(
    ("distribution", "digest"),
    [
        ("uniform", 0x262A582215E4CAA8),
        ("zipf", 0xDE15A8D93F85E7AF),
        ("sequential", 0xCA4F56B03FE748F2),
    ],
)
def test_default_phase_draws_exactly_the_accesses_it_drew_before_the_page_cache(
    distribution: str, digest: int
) -> None:
    """Digests recorded with the access streams as they were before the page cache existed:
    a phase without one draws the same pages, writes and contents, in the same order."""
    phase = Phase(distribution=distribution, working_set=0.3, offset=0.5, write_ratio=0.3, seed=3)
    stream = AccessStream(phase, 4096, 1, 2, 7)
    h = xxhash.xxh3_64()
    for _ in range(3):
        chunk = stream.chunk()
        assert chunk.blocks is None
        for array in chunk[:3]:
            h.update(np.ascontiguousarray(array).tobytes())
    assert h.intdigest() == digest


@pytest.mark.parametrize("distribution", ["uniform", "zipf", "sequential"])
def test_cache_reads_are_reads_of_blocks_within_the_cache_the_rest_anonymous(
    distribution: str,
) -> None:
    phase = Phase(
        distribution=distribution,
        working_set=0.25,
        offset=0.5,
        write_ratio=0.5,
        cache=0.4,
        cache_ratio=0.3,
    )
    stream = AccessStream(phase, 1000, 0, 2, 1)
    nblocks = cache_blocks(phase, 1000)
    assert nblocks == 400
    cached = 0
    for _ in range(20):
        chunk = stream.chunk()
        assert chunk.blocks is not None
        is_cache = chunk.blocks >= 0
        cached += int(is_cache.sum())
        assert (chunk.blocks[is_cache] < nblocks).all()
        assert not chunk.writes[is_cache].any()  # page-cache accesses only read
        anon = chunk.bpns[~is_cache]
        assert ((anon >= 500) & (anon < 750)).all()
    assert cached / (20 * CHUNK) == pytest.approx(0.3, abs=0.02)


# ---- GuestOS bookkeeping -----------------------------------------------------------------------


def test_claim_takes_a_page_from_the_pool_the_cache_or_the_balloon() -> None:
    os = GuestOS(16)
    os.cache_limit = 4
    cache_page = os.cache_page_for(block=2, unavailable=never)
    assert cache_page == 15  # the free pool gives its highest page first
    balloon = os.inflate(2, never)
    assert balloon.tolist() == [14, 13]
    os.claim(0)
    os.claim(cache_page)
    os.claim(14)
    assert kinds(os, [0, 15, 14, 13]) == [ANON, ANON, ANON, BALLOON]
    assert os.cached_page(2) == -1  # the anonymous access dropped the block
    assert (os.cache_claims, os.balloon_returns) == (1, 1)
    assert os.sizes() == {"free": 12, "anon": 3, "cache": 0, "balloon": 1}
    os.claim(0)  # already anonymous: nothing changes
    assert os.sizes()["anon"] == 3
    assert os.check() == []


def test_cache_fills_from_the_pool_up_to_its_size_then_evicts_the_oldest_block() -> None:
    os = GuestOS(16)
    os.cache_limit = 3
    pages = [os.cache_page_for(b, never) for b in (10, 11, 12)]
    assert pages == [15, 14, 13]
    assert os.cache_page_for(13, never) == 15  # at its size: block 10's page is reused
    assert os.cached_page(10) == -1 and os.cached_page(13) == 15
    assert os.cache_evictions == 1
    # An unavailable page (pinned, a fault in flight) is passed over, and stays cached.
    assert os.cache_page_for(14, lambda p: p == 14) == 13
    assert os.cached_page(11) == 14
    assert os.sizes()["cache"] == 3
    assert os.check() == []


def test_cache_with_an_empty_pool_evicts_and_with_nothing_to_evict_gives_none() -> None:
    os = GuestOS(4)
    os.cache_limit = 4
    for page in range(3):
        os.claim(page)
    assert os.cache_page_for(0, never) == 3
    assert os.cache_page_for(1, never) == 3  # pool empty: block 0 makes room
    assert os.cache_page_for(2, lambda p: True) == -1  # nothing it may take
    assert os.cached_page(1) == 3
    os.claim(3)
    assert os.cache_page_for(2, never) == -1  # everything anonymous
    assert os.check() == []


def test_inflate_takes_free_pages_then_the_oldest_cache_never_anonymous_or_unavailable() -> None:
    os = GuestOS(12)
    os.cache_limit = 4
    for page in range(4):
        os.claim(page)  # anonymous: 0..3
    blocks = {b: os.cache_page_for(b, never) for b in (5, 6, 7, 8)}  # pages 11..8, in order
    assert list(blocks.values()) == [11, 10, 9, 8]
    # Free: 4..7. Page 6 is unavailable (pinned), block 6's page (10) too.
    taken = os.inflate(7, lambda p: p in (6, 10))
    assert taken.tolist() == [7, 5, 4, 11, 9, 8]
    assert os.cached_page(5) == -1 and os.cached_page(6) == 10  # oldest first, 10 skipped
    assert kinds(os, [0, 1, 2, 3]) == [ANON] * 4
    assert kinds(os, [6, 10]) == [FREE, CACHE]
    assert os.balloon_size == 6
    assert os.check() == []


def test_deflate_gives_back_last_in_first_out_skipping_pages_taken_back() -> None:
    os = GuestOS(8)
    os.inflate(5, never)  # 7, 6, 5, 4, 3
    os.claim(4)  # an anonymous access takes 4 back
    given = os.deflate(2)
    assert given.tolist() == [3, 5]
    assert kinds(os, [3, 4, 5, 6, 7]) == [FREE, ANON, FREE, BALLOON, BALLOON]
    # Given back to the pool, they are the first it gives again.
    assert os.inflate(1, never).tolist() == [5]
    assert os.check() == []


def test_cache_evicts_by_clock_a_hit_block_gets_a_second_chance() -> None:
    os = GuestOS(16)
    os.cache_limit = 3
    assert [os.cache_page_for(b, never) for b in (10, 11, 12)] == [15, 14, 13]
    os.referenced[10] = 1  # a hit on the oldest block
    # Block 10 is passed over (its bit cleared, it becomes the youngest); 11 goes.
    assert os.cache_page_for(13, never) == 14
    assert os.cached_page(11) == -1 and os.cached_page(10) == 15
    assert os.referenced[10] == 0
    # Now 12 is the oldest, then 10 (moved), then 13 (just read in, unreferenced).
    assert os.cache_page_for(14, never) == 13
    assert os.cached_page(12) == -1
    # Every block referenced: one sweep clears them all, then the oldest goes.
    for b in (10, 13, 14):
        os.referenced[b] = 1
    assert os.cache_page_for(15, never) == 15
    assert os.cached_page(10) == -1 and os.cache_evictions == 3
    assert [os.referenced[b] for b in (13, 14, 15)] == [0, 0, 0]
    assert os.check() == []


def test_a_new_block_is_unreferenced_and_a_refill_clears_an_old_bit() -> None:
    os = GuestOS(8)
    os.cache_limit = 2
    os.cache_page_for(1, never)
    os.referenced[1] = 1
    os.drop_block(1)
    os.cache_page_for(1, never)  # read in again: no hit since
    assert os.referenced[1] == 0


def test_inflate_takes_cache_pages_coldest_first_by_the_same_clock() -> None:
    os = GuestOS(8)
    os.cache_limit = 8
    for b in range(8):
        os.cache_page_for(b, never)  # pages 7..0, the pool empty
    for b in (0, 1, 4):
        os.referenced[b] = 1  # hot blocks
    taken = os.inflate(4, never)
    assert taken.tolist() == [5, 4, 2, 1]  # blocks 2, 3, 5, 6: never hit since read in
    assert [os.cached_page(b) for b in (0, 1, 4, 7)] == [7, 6, 3, 0]
    assert os.check() == []


def test_free_anon_gives_once_used_pages_the_pool_gives_first() -> None:
    os = GuestOS(12)
    os.cache_limit = 4
    for page in range(6):
        os.claim(page)
    assert os.free_anon(np.array([3, 4, 5, 6], dtype=np.int64)) == 3  # 6 was not anonymous
    assert os.sizes()["free"] == 9 and os.anon_freed == 3
    assert os.used[[3, 4, 5]].all() and not os.used[6:].any()
    # The pool gives its once-used pages first, last freed first, then never-used ones.
    assert os.cache_page_for(2, never) == 5
    assert os.inflate(3, lambda p: p == 4).tolist() == [3, 11, 10]
    assert not os.used[[3, 11, 10]].any()  # the platform freed what backed them
    # A balloon page given back is free and never used: the pool gives it after page 4.
    os.deflate(1)
    assert os.inflate(2, never).tolist() == [4, 10]
    os.claim(4)  # (taken back from the balloon: not a reuse)
    os.free_anon(np.array([4], dtype=np.int64))
    os.claim(4)
    assert os.reused == 1
    assert os.check() == []


def test_inflate_order_once_used_free_never_used_free_then_cache() -> None:
    os = GuestOS(10)
    os.cache_limit = 2
    os.claim(0)
    os.claim(1)
    os.cache_page_for(5, never)  # page 9
    os.cache_page_for(6, never)  # page 8
    os.free_anon(np.array([0], dtype=np.int64))  # once used
    assert os.inflate(10, never).tolist() == [0, 7, 6, 5, 4, 3, 2, 9, 8]
    assert os.sizes() == {"free": 0, "anon": 1, "cache": 0, "balloon": 9}
    assert os.check() == []


def test_random_operations_keep_every_invariant() -> None:
    """Claims, fills, drops, inflations and deflations in random order: the counts, the
    block/page maps and the stacks agree after every step."""
    rng = np.random.default_rng(5)
    os = GuestOS(64)
    os.cache_limit = 24
    for _ in range(4000):
        op = rng.integers(0, 7)
        if op == 0:
            os.claim(int(rng.integers(0, 64)))
        elif op == 1:
            os.cache_page_for(int(rng.integers(0, 40)), lambda p: p % 7 == 0)
        elif op == 2:
            os.inflate(int(rng.integers(0, 6)), lambda p: p % 5 == 0)
        elif op == 3:
            os.deflate(int(rng.integers(0, 6)))
        elif op == 4:
            os.drop_block(int(rng.integers(0, 40)))
        elif op == 5:
            os.free_anon(rng.integers(0, 64, int(rng.integers(0, 4))).astype(np.int64))
        else:
            os.referenced[int(rng.integers(0, 40))] = 1  # a hit
        assert os.check() == []
    assert sum(os.counts) == 64


# ---- vCPUs with a page cache -------------------------------------------------------------------


@pytest.mark.timeout(20)
async def test_vcpus_refault_cold_blocks_then_hit_and_every_read_matches() -> None:
    """A phase reading half of its accesses through a cache that holds every block: each
    block refaults once (a disk read, counted as stall), later reads hit; the blocks'
    content is written into their pages and every read of them is checked."""
    rig = Rig(pages=256)
    await rig.run(
        duration=0.6,
        working_set=0.25,
        write_ratio=0.5,
        cache=0.25,
        cache_ratio=0.5,
        refault_ms=2,
    )
    os = rig.os
    assert os.refaults == 64  # every block once: the cache holds all 64
    assert os.cache_hits > 10 * os.refaults
    assert os.sizes()["cache"] == 64 and os.uncached_reads == 0
    assert os.refault_seconds >= 64 * 0.002
    assert rig.progress.stalled_total(rig.progress.clock()) > 0
    assert rig.guest.mismatches == 0 and rig.guest.verified > os.cache_hits
    # The anonymous working set is the low quarter; the cache came from the top of the pool.
    assert (os.kind[:64] == ANON).all()
    assert (os.kind[192:] == CACHE).all()
    result = await rig.runner.verify()
    assert result["mismatches"] == 0 and result["pages_verified"] == 128
    assert os.check() == []


@pytest.mark.timeout(20)
async def test_a_guest_short_of_memory_keeps_refaulting_in_the_pages_it_has_left() -> None:
    """Anonymous memory holds three quarters of the guest, the file needs half: the page
    cache gets the 16 free pages, evicts its oldest block for every refault, and reads
    keep missing."""
    rig = Rig(pages=64)
    await rig.run(duration=0.2, working_set=0.75, write_ratio=1.0, distribution="sequential")
    assert rig.os.sizes()["anon"] == 48
    await rig.run(duration=0.5, working_set=0.75, cache=0.5, cache_ratio=0.5, refault_ms=0.2)
    os = rig.os
    assert os.sizes() == {"free": 0, "anon": 48, "cache": 16, "balloon": 0}
    assert os.refaults > 64  # the 32 blocks, and again
    assert os.cache_evictions == os.refaults - 16
    assert rig.guest.mismatches == 0
    assert os.check() == []


@pytest.mark.timeout(20)
async def test_anonymous_accesses_drop_cached_blocks_on_their_pages() -> None:
    """The working set grows over pages the cache holds: the guest takes them back (their
    blocks are dropped), and a later read of such a block refaults into another page."""
    rig = Rig(pages=128)
    await rig.run(duration=0.3, working_set=0.1, cache=0.25, cache_ratio=1.0, refault_ms=0.1)
    assert rig.os.sizes()["cache"] == 32  # pages 96..127
    await rig.run(duration=0.3, working_set=0.1, offset=0.9, write_ratio=1.0)
    assert (rig.os.kind[115:127] == ANON).all()
    assert rig.os.cache_claims >= 12
    assert rig.os.check() == []
    result = await rig.runner.verify()
    assert result["mismatches"] == 0


@pytest.mark.timeout(20)
async def test_vcpus_set_the_referenced_bit_of_every_block_they_hit() -> None:
    rig = Rig(pages=128)
    await rig.run(duration=0.3, working_set=0.1, cache=0.25, cache_ratio=1.0, refault_ms=0)
    os = rig.os
    assert os.cache_hits > 0
    ref = np.frombuffer(os.referenced, dtype=np.uint8)
    # A block is unreferenced when read in; every cached block was hit since (32 blocks,
    # thousands of uniform reads).
    assert ref[:32].all() and not ref[32:].any()


@pytest.mark.timeout(20)
async def test_a_phase_frees_its_top_anonymous_pages_and_a_reused_one_is_written_first() -> None:
    """A phase writes half the guest and frees the top half of it when it ends: free pages
    the guest once used, still backed. A read-only phase over the same pages takes them
    again: the guest clears each before it reads it, so its first access is a write (a
    write fault where the host no longer maps it: the old content comes back, to be
    overwritten), and every read matches what the guest last wrote."""
    rig = Rig(pages=64)
    await rig.run(
        duration=0.2, working_set=0.5, write_ratio=1.0, distribution="sequential", anon_freed=0.5
    )
    os = rig.os
    assert os.sizes() == {"free": 48, "anon": 16, "cache": 0, "balloon": 0}
    assert (os.kind[16:32] == FREE).all() and os.used[16:32].all() and os.anon_freed == 16
    assert os.summary()["free_once_used"] == 16
    assert rig.daemon.backed[16:32].all()  # the host was not told
    # The host swaps some of them out (it cannot tell they are free): no longer mapped,
    # their content kept.
    swapped = np.arange(20, 24, dtype=np.int64)
    rig.exposure.invalidate(swapped)
    versions = rig.guest.version.copy()
    faults_before = len(rig.daemon.faults)
    await rig.run(duration=0.2, working_set=0.5, write_ratio=0.0, distribution="sequential")
    assert (os.kind[:32] == ANON).all() and os.reused == 16
    assert (rig.guest.version[16:32] == versions[16:32] + 1).all()  # one clearing write each
    assert (rig.guest.version[:16] == versions[:16]).all()  # read only
    faults = {f.bpn: f.write for f in rig.daemon.faults[faults_before:]}
    assert all(faults[b] for b in swapped.tolist())  # write faults: the old content read in
    assert rig.guest.mismatches == 0 and rig.guest.verified > 0
    result = await rig.runner.verify()
    assert result["mismatches"] == 0 and result["pages_verified"] == 32
    assert os.check() == []


def test_vcpus_of_a_vm_share_one_read_only_zipf_table() -> None:
    """Every vCPU of a phase draws from the same Zipf CDF and permutation (16 B per page
    once, not per vCPU); the table cannot be changed through one of them."""
    phase = Phase(distribution="zipf", working_set=0.5, seed=4)
    a, b = (AccessStream(phase, 8192, vcpu, 2, 11) for vcpu in (0, 1))
    assert a.anon.cdf is b.anon.cdf and a.anon.perm is b.anon.perm
    assert not a.anon.cdf.flags.writeable and not a.anon.perm.flags.writeable
    other = AccessStream(phase, 8192, 0, 2, 12)  # another VM: its own permutation
    assert other.anon.perm is not a.anon.perm
    assert not np.array_equal(other.anon.perm, a.anon.perm)


@pytest.mark.timeout(20)
async def test_verification_faults_once_per_widest_window() -> None:
    """Verification walks its pages: the first faults go every MAX_FAULT_AROUND + 1 missing
    pages and ask for MAX_FAULT_AROUND neighbours (a swap-in reply maps up to that many), so
    no fault is sent for a page an earlier reply is mapping; what is left goes one by one."""
    from shared.constants import MAX_FAULT_AROUND

    rig = Rig(pages=256)
    await rig.run(duration=1.0, working_set=1.0, distribution="sequential", write_ratio=1.0)
    written = rig.guest.written_pages()
    assert len(written) == 256
    rig.exposure.invalidate(written)  # as after a swap-out of everything
    before = len(rig.daemon.faults)
    result = await rig.runner.verify()
    assert result["mismatches"] == 0 and result["pages_verified"] == 256
    faults = rig.daemon.faults[before:]
    wide = [f for f in faults if f.around]
    assert [f.bpn for f in wide] == list(range(0, 256, MAX_FAULT_AROUND + 1))
    assert {f.around for f in wide} == {MAX_FAULT_AROUND}
    assert len(faults) == 256  # this fake daemon maps one page a fault: the rest one by one

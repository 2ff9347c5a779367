"""Lease renewal: every held lease is renewed in one pipelined round trip; a lease another
worker took is reported lost, and only that one."""

from __future__ import annotations

import fakeredis

from shared.keys import Keys
from worker.runtime.lease import LeaseKeeper

JOBS = 300


def test_renew_all_refreshes_every_lease_and_spots_the_stolen_one() -> None:
    redis = fakeredis.FakeRedis(decode_responses=True)
    keys = Keys()
    keeper = LeaseKeeper(redis, keys, "w1", ttl_s=3.0, done_ttl_s=60)
    ids = [f"job-{i:04d}" for i in range(JOBS)]
    assert all(keeper.acquire(j) for j in ids)
    for j in ids:
        # Short of the 3 s a renewal gives, yet long enough not to lapse before renew_all
        # reaches it on a busy machine (100 ms did: the test failed under load).
        redis.pexpire(keys.job_claim(j), 1_500)
    redis.set(keys.job_claim(ids[7]), "w2", px=3000)  # another worker took this one

    keeper.renew_all()

    ttls = [redis.pttl(keys.job_claim(j)) for j in ids]
    assert all(2_000 < t <= 3_000 for t in ttls)
    assert redis.get(keys.job_claim(ids[7])) == "w2"
    assert [j for j in ids if keeper.lost(j)] == [ids[7]]

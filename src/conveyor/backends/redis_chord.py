"""Chords on Redis, counted in Celery's keys (PROTOCOL.md 4.3), so a Celery producer's
chord completes on Conveyor workers and ours on Celery workers.

Keys hang off the group key ``celery-taskset-meta-<gid>``: ``.s`` the header size (set by
the producer), ``.j`` the finished parts (a sorted set scored by group index), ``.d`` the
parts already counted (a redelivered part counts once), ``.t`` parts added later by
``add_to_chord``, and ``.c`` the claim of the one worker that sends the body, replaced by
``done`` afterwards so a late duplicate cannot start the chord over.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from conveyor import serialization, states

if TYPE_CHECKING:
    import redis
    from conveyor.backends.base import Meta, ResultBackend

# Count one finished part and, if it was the last, claim the body in the same step.
# Returns {count, size-or-false, extra, claimed}; count -1 means the chord is over.
_COUNT_PART = """
local jkey, tkey, skey, dkey, ckey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local task_id, entry, index = ARGV[1], ARGV[2], ARGV[3]
local ttl, claim_ttl, token = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
if redis.call('GET', ckey) == 'done' then
  return {-1, false, false, 0}
end
local seen = task_id .. ':' .. index
if redis.call('SADD', dkey, seen) == 1 then
  redis.call('ZADD', jkey, index, entry)
end
local count = redis.call('ZCARD', jkey)
if ttl > 0 then
  for _, key in ipairs({jkey, tkey, skey, dkey}) do
    redis.call('EXPIRE', key, ttl)
  end
end
local size = redis.call('GET', skey)
local extra = redis.call('GET', tkey)
local claimed = 0
if size and count == tonumber(size) + tonumber(extra or 0) then
  if redis.call('SET', ckey, token, 'NX', 'EX', claim_ttl) then
    claimed = 1
  end
end
return {count, size, extra, claimed}
"""

# Forget the chord once its body is sent, if the claim is still ours; leave 'done'.
_FINISH = """
local ckey = KEYS[1]
if redis.call('GET', ckey) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('SET', ckey, 'done', 'EX', tonumber(ARGV[2]))
return 1
"""

CLAIM_SECONDS = 30
DONE_SECONDS = 300


@dataclass(frozen=True, slots=True)
class ChordKeys:
    group: str

    @property
    def results(self) -> str:
        return f"{self.group}.j"

    @property
    def added(self) -> str:
        return f"{self.group}.t"

    @property
    def size(self) -> str:
        return f"{self.group}.s"

    @property
    def counted(self) -> str:
        return f"{self.group}.d"

    @property
    def claim(self) -> str:
        return f"{self.group}.c"

    def all_data(self) -> list[str]:
        return [self.results, self.added, self.size, self.counted]


class RedisChords:
    """The chord bookkeeping of one Redis result backend."""

    def __init__(self, backend: ResultBackend, client: redis.Redis, group_key: Any) -> None:
        self.backend = backend
        self.client = client
        self.group_key = group_key
        self._count = client.register_script(_COUNT_PART)
        self._finish = client.register_script(_FINISH)

    def _ttl(self) -> int:
        expires = self.backend.expires
        return int(expires) if expires else 0

    def prepare(self, group_id: str, size: int) -> None:
        """What a producer does before sending the header: a fresh run of this group."""
        keys = ChordKeys(self.group_key(group_id))
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(keys.claim)
            ttl = self._ttl()
            pipe.set(keys.size, size, ex=ttl or None)
            pipe.execute()

    def count_part(self, group_id: str, task_id: str, group_index: int | None) -> (
            list[Meta] | None):
        """Record this part's stored result; the header's documents in order when this
        call completed the chord and won the claim to send the body, else None."""
        meta = self.backend.get(task_id)
        if meta is None or meta.get("status") not in states.READY_STATES:
            return None
        entry, _, _ = serialization.dumps(
            [1, task_id, meta["status"], meta.get("result")], self.backend.serializer)
        keys = ChordKeys(self.group_key(group_id))
        token = secrets.token_hex(16)
        index = "+inf" if group_index is None else str(group_index)
        count, size, _, claimed = self._count(
            keys=[keys.results, keys.added, keys.size, keys.counted, keys.claim],
            args=[task_id, entry, index, self._ttl(), CLAIM_SECONDS, token])
        if count == -1 or not size or not claimed:
            return None
        metas = [self._meta_of(bytes(raw)) for raw in  # type: ignore[arg-type]
                 self.client.zrange(keys.results, 0, -1)]
        self._finish(keys=[keys.claim, *keys.all_data()], args=[token, DONE_SECONDS])
        return metas

    def _meta_of(self, raw: bytes) -> Meta:
        content_type, encoding = serialization.content_type_of(self.backend.serializer)
        _, task_id, status, result = serialization.loads(raw, content_type, encoding,
                                                         self.backend.accept)
        return {"status": status, "result": result, "task_id": task_id}

"""The Redis broker's Lua scripts: every move of a message is one atomic step.

A message is always in exactly one place: a queue list, the unacked records (``unacked``
+ ``unacked_index``, shared with kombu, plus Conveyor's lease zset), a delayed zset, or a
dead-letter list. Each script moves it from one place to the next inside Redis, so a
client that dies between two calls can never lose a message.

``_conveyor.deliveries`` holds, per delivery tag, a small JSON record: ``n`` deliveries so
far, ``t`` the current lease token ('' when nobody holds it), ``q`` the list it came
from, and the lengths ``l`` of the envelope and ``s`` of the unacked entry this broker
wrote. The entry is ``[<envelope>,"<exchange>","<routing key>"]`` (kombu's format), so the
envelope is its bytes 2..l+1; checking ``s`` first tells our entry from one a Celery
worker wrote for the same tag after restoring the message.
"""

from __future__ import annotations

_HELPERS = """
local function record_of(records, tag)
  local raw = redis.call('HGET', records, tag)
  if not raw then return nil end
  local ok, rec = pcall(cjson.decode, raw)
  if ok and type(rec) == 'table' then return rec end
  return nil
end

local function held_payload(unacked, tag, rec)
  local entry = redis.call('HGET', unacked, tag)
  if not entry or not rec.l or #entry ~= rec.s or string.sub(entry, 1, 1) ~= '[' then
    return nil
  end
  return string.sub(entry, 2, rec.l + 1)
end

-- Whether the unacked entry is still the one this broker wrote, by its length alone:
-- HSTRLEN reads no copy of the envelope into Lua, where acking needs no payload.
local function holds_entry(unacked, tag, rec)
  return rec.l ~= nil and redis.call('HSTRLEN', unacked, tag) == rec.s
end

local function save(records, tag, rec)
  redis.call('HSET', records, tag, cjson.encode(rec))
end

local function held(records, tag, token)
  local rec = record_of(records, tag)
  if rec and rec.t ~= '' and rec.t == token then return rec end
  return nil
end
"""

# KEYS: unacked, unacked_index, deliveries, then per queue (leased, delayed,
#       delayed_messages, dead), then the list keys: step by step, each step listing
#       one key per queue in queue order.
# ARGV: now, lease_until, max, token_prefix, queue count, per-queue scan limit,
#       dead-letter cap.
# Returns {next_due_or_'', invalid_count, more, (queue index, envelope, tag, count,
#          token)...}; ``more`` is 1 if any of the lists still holds a message.
FETCH = (
    _HELPERS
    + """
local now, lease_until = tonumber(ARGV[1]), ARGV[2]
local max, prefix = tonumber(ARGV[3]), ARGV[4]
local nq, limit, dead_limit = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local unacked, index, records = KEYS[1], KEYS[2], KEYS[3]
local function qkey(i, n) return KEYS[3 + 4 * (i - 1) + n] end
local first_list = 4 + 4 * nq
local steps = (#KEYS - first_list + 1) / nq

for i = 1, nq do
  -- Leases that lapsed go back to the head of their list, as kombu restores them.
  local leased = qkey(i, 1)
  local lapsed = redis.call('ZRANGE', leased, '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, limit)
  for _, tag in ipairs(lapsed) do
    redis.call('ZREM', leased, tag)
    local rec = record_of(records, tag)
    if rec then
      local payload = held_payload(unacked, tag, rec)
      if payload then
        redis.call('HDEL', unacked, tag)
        redis.call('ZREM', index, tag)
        redis.call('RPUSH', rec.q, payload)
      end
      rec.t = ''
      save(records, tag, rec)
    end
  end
  -- Delayed messages that are due join the tail, in the order they were delayed.
  local delayed, stash = qkey(i, 2), qkey(i, 3)
  local due = redis.call('ZRANGE', delayed, '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, limit)
  for _, tag in ipairs(due) do
    local payload = redis.call('HGET', stash, tag)
    redis.call('ZREM', delayed, tag)
    redis.call('HDEL', stash, tag)
    local rec = record_of(records, tag)
    if payload and rec and rec.q then
      redis.call('LPUSH', rec.q, payload)
    end
  end
end

local out = {'', 0, 0}
local taken = 0

local function take(payload, key, qi)
  local ok, env = pcall(cjson.decode, payload)
  local props = ok and type(env) == 'table' and env.properties
  local tag = type(props) == 'table' and props.delivery_tag
  if type(tag) ~= 'string' or tag == '' then
    local dead = qkey(qi, 4)
    redis.call('LPUSH', dead, cjson.encode({payload = payload, dead_at = now,
      delivery_count = 1,
      reason = 'not a kombu envelope (a JSON object with properties.delivery_tag)'}))
    redis.call('LTRIM', dead, 0, dead_limit - 1)
    out[2] = out[2] + 1
    return
  end
  local info = props.delivery_info
  local exchange, routing_key = '', ''
  if type(info) == 'table' then
    if type(info.exchange) == 'string' then exchange = info.exchange end
    if type(info.routing_key) == 'string' then routing_key = info.routing_key end
  end
  local entry = '[' .. payload .. ',' .. cjson.encode(exchange) .. ','
    .. cjson.encode(routing_key) .. ']'
  local rec = record_of(records, tag)
  local count = 1
  if rec and tonumber(rec.n) then count = tonumber(rec.n) + 1 end
  if count == 1 then
    local headers = env.headers
    if (type(info) == 'table' and info.redelivered == true)
        or (type(headers) == 'table' and headers.redelivered == true) then
      count = 2
    end
  end
  taken = taken + 1
  local token = prefix .. taken
  redis.call('HSET', unacked, tag, entry)
  redis.call('ZADD', index, ARGV[1], tag)
  redis.call('ZADD', qkey(qi, 1), lease_until, tag)
  save(records, tag, {n = count, t = token, q = key, l = #payload, s = #entry})
  local n = #out
  out[n + 1], out[n + 2], out[n + 3], out[n + 4], out[n + 5] = qi, payload, tag, count, token
end

-- Celery's order: priority step first (step 0 is served first), then the queues in
-- turn, one message each, so one busy queue does not starve the others.
for step = 1, steps do
  if taken >= max then break end
  local base = first_list + (step - 1) * nq
  if nq == 1 then
    local items = redis.call('RPOP', KEYS[base], max - taken)
    if items then
      for _, payload in ipairs(items) do take(payload, KEYS[base], 1) end
    end
  else
    local empty = {}
    local active = nq
    while active > 0 and taken < max do
      for qi = 1, nq do
        if taken >= max then break end
        if not empty[qi] then
          local payload = redis.call('RPOP', KEYS[base + qi - 1])
          if payload then
            take(payload, KEYS[base + qi - 1], qi)
          else
            empty[qi] = true
            active = active - 1
          end
        end
      end
    end
  end
end

-- Whether a look right now would find more: the caller lets a sibling listen and
-- stops the change reports only then.
for k = first_list, #KEYS do
  if redis.call('LLEN', KEYS[k]) > 0 then
    out[3] = 1
    break
  end
end

-- When the earliest lease lapses or delayed message is due, so an idle fetch knows
-- how long it may sleep.
local next_due = nil
for i = 1, nq do
  for n = 1, 2 do
    local first = redis.call('ZRANGE', qkey(i, n), 0, 0, 'WITHSCORES')
    if first[2] and (next_due == nil or tonumber(first[2]) < next_due) then
      next_due = tonumber(first[2])
      out[1] = first[2]
    end
  end
end
return out
"""
)

# KEYS: unacked, unacked_index, deliveries, leased (one per delivery, in ARGV order).
# ARGV: tag, token, tag, token, ...   Returns how many were still held.
ACK = (
    _HELPERS
    + """
local unacked, index, records = KEYS[1], KEYS[2], KEYS[3]
local done = 0
for i = 1, #ARGV / 2 do
  local tag = ARGV[2 * i - 1]
  local rec = held(records, tag, ARGV[2 * i])
  if rec then
    redis.call('ZREM', KEYS[3 + i], tag)
    redis.call('HDEL', records, tag)
    -- An entry someone else wrote since (a Celery worker that restored and took the
    -- message) is theirs to settle.
    if holds_entry(unacked, tag, rec) then
      redis.call('HDEL', unacked, tag)
      redis.call('ZREM', index, tag)
      done = done + 1
    end
  end
end
return done
"""
)

# KEYS: unacked_index, deliveries, leased (one per delivery).
# ARGV: now, lease_until, tag, token, tag, token, ...
EXTEND = (
    _HELPERS
    + """
local index, records = KEYS[1], KEYS[2]
local done = 0
for i = 1, (#ARGV - 2) / 2 do
  local tag = ARGV[2 * i + 1]
  if held(records, tag, ARGV[2 * i + 2]) then
    -- kombu restores by "delivered before now - visibility_timeout": a renewed score
    -- keeps Celery workers from restoring a message a live Conveyor worker holds.
    redis.call('ZADD', index, 'XX', ARGV[1], tag)
    done = done + redis.call('ZADD', KEYS[2 + i], 'XX', 'CH', ARGV[2], tag)
  end
end
return done
"""
)

# KEYS: unacked, unacked_index, deliveries, leased, delayed, delayed_messages.
# ARGV: tag, token, until.
DEFER = (
    _HELPERS
    + """
local tag = ARGV[1]
local rec = held(KEYS[3], tag, ARGV[2])
if not rec then return 0 end
local payload = held_payload(KEYS[1], tag, rec)
redis.call('ZREM', KEYS[4], tag)
rec.t = ''
if payload then
  redis.call('HDEL', KEYS[1], tag)
  redis.call('ZREM', KEYS[2], tag)
  redis.call('ZADD', KEYS[5], ARGV[3], tag)
  redis.call('HSET', KEYS[6], tag, payload)
  -- Waiting for an eta is not a failed delivery: the next one counts as this one.
  rec.n = math.max(0, (tonumber(rec.n) or 1) - 1)
end
save(KEYS[3], tag, rec)
if payload then return 1 end
return 0
"""
)

# KEYS: unacked, unacked_index, deliveries, leased.   ARGV: tag, token.
REQUEUE = (
    _HELPERS
    + """
local tag = ARGV[1]
local rec = held(KEYS[3], tag, ARGV[2])
if not rec then return 0 end
local payload = held_payload(KEYS[1], tag, rec)
redis.call('ZREM', KEYS[4], tag)
rec.t = ''
save(KEYS[3], tag, rec)
if not payload then return 0 end
redis.call('HDEL', KEYS[1], tag)
redis.call('ZREM', KEYS[2], tag)
redis.call('LPUSH', rec.q, payload)
return 1
"""
)

# Give back what one fetch leased when nobody read its reply (the fetch was sent ahead
# and its process died): the leases whose token starts with the fetch's prefix. They go
# back to the head of their lists, where the fetch took them from.
# KEYS: unacked, unacked_index, deliveries, then the leased zset of each queue fetched.
# ARGV: token prefix.   Returns how many went back.
RELEASE_FETCH = (
    _HELPERS
    + """
local prefix = ARGV[1]
local found = {}
for i = 4, #KEYS do
  for _, tag in ipairs(redis.call('ZRANGE', KEYS[i], 0, -1)) do
    local rec = record_of(KEYS[3], tag)
    if rec and type(rec.t) == 'string' and string.sub(rec.t, 1, #prefix) == prefix then
      local payload = held_payload(KEYS[1], tag, rec)
      local number = tonumber(string.sub(rec.t, #prefix + 1)) or 0
      redis.call('ZREM', KEYS[i], tag)
      rec.t = ''
      save(KEYS[3], tag, rec)
      if payload then
        redis.call('HDEL', KEYS[1], tag)
        redis.call('ZREM', KEYS[2], tag)
        -- The token's number is the order the fetch took them in.
        found[#found + 1] = {number, rec.q, payload}
      end
    end
  end
end
-- The last taken goes back first, so the first taken ends up at the head again.
table.sort(found, function(a, b) return a[1] > b[1] end)
for _, item in ipairs(found) do redis.call('RPUSH', item[2], item[3]) end
return #found
"""
)

# KEYS: unacked, unacked_index, deliveries, leased, dead.
# ARGV: tag, token, reason, now, cap.
DEAD_LETTER = (
    _HELPERS
    + """
local tag = ARGV[1]
local rec = held(KEYS[3], tag, ARGV[2])
if not rec then return 0 end
local payload = held_payload(KEYS[1], tag, rec)
redis.call('ZREM', KEYS[4], tag)
redis.call('HDEL', KEYS[3], tag)
if not payload then return 0 end
redis.call('HDEL', KEYS[1], tag)
redis.call('ZREM', KEYS[2], tag)
redis.call('LPUSH', KEYS[5], cjson.encode({payload = payload, reason = ARGV[3],
  dead_at = tonumber(ARGV[4]), delivery_count = tonumber(rec.n) or 1}))
redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[5]) - 1)
return 1
"""
)

# Record a message that arrived by pub/sub (a Celery fanout publish) as delivered.
# KEYS: unacked, unacked_index, deliveries, leased.
# ARGV: tag, envelope, exchange JSON, routing key JSON, list key, now, lease_until, token.
RECORD = (
    _HELPERS
    + """
local tag, payload = ARGV[1], ARGV[2]
local entry = '[' .. payload .. ',' .. ARGV[3] .. ',' .. ARGV[4] .. ']'
local rec = record_of(KEYS[3], tag)
local count = 1
if rec and tonumber(rec.n) then count = tonumber(rec.n) + 1 end
redis.call('HSET', KEYS[1], tag, entry)
redis.call('ZADD', KEYS[2], ARGV[6], tag)
redis.call('ZADD', KEYS[4], ARGV[7], tag)
save(KEYS[3], tag, {n = count, t = ARGV[8], q = ARGV[5], l = #payload, s = #entry})
return count
"""
)

# Give back a delivery that a Celery worker took and never settled (kombu's restore).
# KEYS: unacked, unacked_index, deliveries, then the lists it goes back to.
# ARGV: tag, sha1 of the entry as read, highest score that counts as lapsed, envelope.
RESTORE_FOREIGN = (
    _HELPERS
    + """
local tag = ARGV[1]
local entry = redis.call('HGET', KEYS[1], tag)
if not entry then
  redis.call('ZREM', KEYS[2], tag)
  return 0
end
if redis.sha1hex(entry) ~= ARGV[2] then return 0 end
local score = redis.call('ZSCORE', KEYS[2], tag)
if score and tonumber(score) > tonumber(ARGV[3]) then return 0 end
local rec = record_of(KEYS[3], tag)
if rec and rec.t ~= '' and held_payload(KEYS[1], tag, rec) then return 0 end
redis.call('HDEL', KEYS[1], tag)
redis.call('ZREM', KEYS[2], tag)
for i = 4, #KEYS do redis.call('RPUSH', KEYS[i], ARGV[4]) end
return 1
"""
)

# KEYS: deliveries, delayed, delayed_messages, then the queue's lists.
PURGE = """
local purged = 0
for i = 4, #KEYS do
  purged = purged + redis.call('LLEN', KEYS[i])
  redis.call('DEL', KEYS[i])
end
local tags = redis.call('ZRANGE', KEYS[2], 0, -1)
for _, tag in ipairs(tags) do redis.call('HDEL', KEYS[1], tag) end
redis.call('DEL', KEYS[2], KEYS[3])
return purged + #tags
"""

# KEYS: lock.   ARGV: token.   Deletes the lock only if we still own it.
RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

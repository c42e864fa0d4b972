"""Every Redis key name of the counter store and the Lua scripts that touch them.

Nothing else in the project spells a key. All keys of one counter share the hash tag
``{c<id>}`` so that a script only ever touches one Redis Cluster slot.

Per counter ``c``:

- ``cs:{c}:v:<period>:<subject>`` hash: ``v`` value, ``peak``, ``ops``, ``upd`` (ms), ``rst`` (ms of
  the last manual reset in the period, if any: what ``lastResetTime`` shows); ``f`` "value ops
  version" when the flusher last derived its delta (PostgreSQL's row holds that version once it
  applied it); ``m`` the open statistics minute, ``mb`` "ops value [1]" when this minute's share
  opened or was last derived ("1": its buckets keep last and max), ``mx`` the highest value since
  then, set (not empty) only while the value is marked changed and not derived yet. ``peak`` lags:
  derivation (and a new minute) raise it to ``mx``. The hash's existence means "hydrated from
  PostgreSQL"; the update script refuses to run on a missing one.
- ``cs:{c}:m:<period>`` set: members already counted in the period (unique counters).
- ``cs:{c}:t:<period>:<subject>`` hash: threshold id -> time (ms) it fired in the period (deleted
  when a re-arming threshold falls back).
- ``cs:{c}:tc:<subject>`` hash: threshold id -> last firing (ms), for cooldowns; it expires when
  the longest running cooldown ends.
- ``cs:{c}:pend`` hash: what the flusher still has to look at, fields ``c|<period>|<subject>`` (the
  value changed: the flusher derives its delta from the value hash), ``u|<period>|<subject>|<member>``
  new unique member, ``e|<period>|<subject>|<threshold id>|<ms>`` crossing,
  ``b|<minute>|<period>|<subject>`` a closed minute's statistics share ("ops delta [last max]"),
  ``since`` time (ms) of its first change mark and ``n`` how many values it marks changed (read by
  ``/metrics``: flush lag and pending deltas; the flusher skips them).
- ``cs:{c}:log`` list: operation-log entries (JSON) for counters that log operations.
- ``cs:{c}:ik:<app id>:<Idempotency-Key>`` string: what the update script answered to the write
  that first used that key (see ``IDEMPOTENT_PROLOGUE``); it expires after the key's lifetime.
- Presence counters (``docs/presence.md``), leases of ``<user>|<session>`` (session may be empty):
  ``cs:{c}:ps`` sorted set lease -> expiry (ms); ``cs:{c}:pu`` hash user -> live leases;
  ``cs:{c}:px`` sorted set (all scores 0, ranged by name) of leases, to find a user's;
  ``cs:{c}:pn`` sorted set node -> expiry (ms); ``cs:{c}:pnm`` sorted set (scores 0) of
  ``<node>|<lease>``, to find a node's; ``cs:{c}:psn`` hash lease -> node. The value hash holds
  the count as of the last script run (what the flusher persists).
- ``cs:{c}:batches`` set of batch ids moved out of ``pend``/``log`` and not yet deleted;
  ``cs:{c}:b:<id>`` / ``cs:{c}:bl:<id>`` hold one batch.

The value hashes, member sets and threshold marks of a closed period are deleted by the archive
task (``TRIM_PERIOD_SCRIPT``) once nothing of that period is pending; every key of a deleted
counter by the flush task (``cs:deleted`` queues them).

Per counter also the shard channel ``cs:{c}:ev`` (``stream_channel``): every change of one of its
values is published there (``SPUBLISH``, by the script that made it) as "<value> <ms> <period>|<subject>"
for the server-sent event streams (``counters.fastlane.streams``).

Global: ``cs:cfg:gen`` (config generation, bumped on every config change), ``cs:lock:<name>``,
``cs:deleted`` (deleted counters whose keys are still to be dropped) and ``cs:archive:done`` (start
time, ms, of the last archive run that completed: ``/metrics`` derives the archive lag from it).
"""

PREFIX = "cs"

# Values are exact integers in JavaScript's safe range; Lua (doubles) compares them exactly too.
MAX_SAFE_VALUE = 2**53 - 1


# A split counter (``Counter.shards`` > 1, ``docs/splitting.md``) keeps shard k > 0 of each value under
# its own hash tag ``{c<id>s<k>}``, so its shards land in other Cluster slots; shard 0 is the counter's
# own tag. Every key function takes such a *unit* (``unit``) where it says ``counter_id``: a shard has
# the whole key set of a counter (value hashes, member sets, pending hash, batches, records).
Unit = int | str


def unit(counter_id: int, shard: int) -> Unit:
    """The keys' unit of a counter's shard: the counter id itself for shard 0."""
    return counter_id if shard == 0 else f"{counter_id}s{shard}"


def unit_parts(unit_id: Unit) -> tuple[int, int]:
    """``(counter id, shard)`` of a unit made by ``unit``."""
    if isinstance(unit_id, int):
        return unit_id, 0
    counter_id, _, shard = unit_id.partition("s")
    return int(counter_id), int(shard or 0)


def _tag(counter_id: Unit) -> str:
    return f"{PREFIX}:{{c{counter_id}}}"


def value_key(counter_id: Unit, period: str, subject: str) -> str:
    return f"{_tag(counter_id)}:v:{period}:{subject}"


def members_key(counter_id: Unit, period: str) -> str:
    return f"{_tag(counter_id)}:m:{period}"


def threshold_marks_key(counter_id: Unit, period: str, subject: str) -> str:
    return f"{_tag(counter_id)}:t:{period}:{subject}"


def threshold_cooldown_key(counter_id: Unit, subject: str) -> str:
    return f"{_tag(counter_id)}:tc:{subject}"


def pending_key(counter_id: Unit) -> str:
    return f"{_tag(counter_id)}:pend"


def oplog_key(counter_id: Unit) -> str:
    return f"{_tag(counter_id)}:log"


def batches_key(counter_id: Unit) -> str:
    return f"{_tag(counter_id)}:batches"


def batch_key(counter_id: Unit, batch_id: str) -> str:
    return f"{_tag(counter_id)}:b:{batch_id}"


def batch_log_key(counter_id: Unit, batch_id: str) -> str:
    return f"{_tag(counter_id)}:bl:{batch_id}"


def counter_keys_pattern(counter_id: int) -> str:
    return f"{_tag(counter_id)}:*"


# Matches every period-scoped key (value hashes, member sets, threshold marks) of every counter.
PERIOD_SCOPED_KEYS_PATTERN = f"{PREFIX}:{{c*}}:[vmt]:*"


def _unit_of_tag(tag: str) -> Unit | None:
    """The unit in a hash tag made by ``_tag`` (``{c<id>}`` or a shard's ``{c<id>s<k>}``), else None."""
    if not (tag.startswith("{c") and tag.endswith("}")):
        return None
    inner = tag[2:-1]
    if inner.isdigit():
        return int(inner)
    counter_id, s, shard = inner.partition("s")
    if s and counter_id.isdigit() and shard.isdigit() and shard[0] != "0":
        return inner
    return None


def _counter_id_of_tag(tag: str) -> int | None:
    """The counter id in a hash tag made by ``_tag`` (of the counter or of one of its shards), else None."""
    found = _unit_of_tag(tag)
    return None if found is None else unit_parts(found)[0]


def period_scoped_key_parts(key: str) -> tuple[Unit, str] | None:
    """``(unit, period)`` of a key matched by ``PERIOD_SCOPED_KEYS_PATTERN``, else None (``unit_parts``
    names its counter)."""
    parts = key.split(":", 3)
    if len(parts) != 4 or parts[0] != PREFIX or parts[2] not in ("v", "m", "t"):
        return None
    found = _unit_of_tag(parts[1])
    return None if found is None else (found, parts[3].split(":", 1)[0])


CONFIG_GENERATION_KEY = f"{PREFIX}:cfg:gen"

# Counters deleted from PostgreSQL whose keys are still to be dropped: sorted set, id -> deletion ms.
DELETED_COUNTERS_KEY = f"{PREFIX}:deleted"
ALL_COUNTER_KEYS_PATTERN = f"{PREFIX}:{{c*"


def counter_id_of_key(key: bytes | str) -> int | None:
    """The counter id in a key of ``ALL_COUNTER_KEYS_PATTERN`` (None for anything else)."""
    parts = (key.decode() if isinstance(key, bytes) else key).split(":", 2)
    return _counter_id_of_tag(parts[1]) if len(parts) > 1 and parts[0] == PREFIX else None


def idempotency_key(counter_id: Unit, app_id: int | None, key: str) -> str:
    """The record of an Idempotency-Key: in the counter's slot (one script, one Cluster slot),
    per app (the caller's), so apps sharing a global counter never see each other's keys."""
    return f"{_tag(counter_id)}:ik:{app_id or 0}:{key}"


ARCHIVE_DONE_KEY = f"{PREFIX}:archive:done"

# Fields of the pending hash that describe it as a whole (no '|': the flusher's parser skips them).
PENDING_SINCE_FIELD = "since"
PENDING_VALUES_FIELD = "n"


# Server-sent events: the change of a value is published, by the script that changed it, on its
# counter's channel. A shard channel (SPUBLISH, Redis 7) with the counter's hash tag: in a Redis
# Cluster it lives in the slot of the keys the script touches, so the script stays single-slot and
# a message reaches only the node that owns the slot (plain PUBLISH would be broadcast over the
# cluster bus to every node). Standalone Redis 7 serves shard channels as well.
STREAM_CHANNEL_SUFFIX = ":ev"


def stream_channel(counter_id: Unit) -> str:
    return f"{_tag(counter_id)}{STREAM_CHANNEL_SUFFIX}"


def stream_message_parse(message: bytes) -> tuple[int, int, str, str]:
    """``(value, ms, period, subject)`` of a message published by ``_PUBLISH_LUA``."""
    value, ms, field = message.split(b" ", 2)
    period, _, subject = field.decode().partition("|")
    return int(value), int(ms), period, subject


# ``publish(vkey, value, ms, field)``: the channel is the value key's hash tag plus the suffix.
_PUBLISH_LUA = f"""
local function publish(vkey, value, ms, field)
  redis.call('SPUBLISH', string.sub(vkey, 1, string.find(vkey, '}}', 1, true)) .. '{STREAM_CHANNEL_SUFFIX}',
    string.format('%d', value) .. ' ' .. ms .. ' ' .. field)
end
"""


def lock_key(name: str) -> str:
    return f"{PREFIX}:lock:{name}"


def value_key_of_mark(counter_id: Unit, mark: bytes | str) -> str:
    """The value hash a pending hash's change mark ``c|<period>|<subject>`` names (DERIVE_SCRIPT's KEYS)."""
    text = mark.decode() if isinstance(mark, bytes) else mark
    period, subject = text[2:].split("|", 1)
    return value_key(counter_id, period, subject)


def value_field(period: str, subject: str) -> str:
    """How the pending hash and the update script's ARGV[3] name one value of a counter."""
    return f"{period}|{subject}"


def update_keys(counter_id: Unit, period: str, subject: str) -> list[str]:
    return [
        value_key(counter_id, period, subject),
        pending_key(counter_id),
        members_key(counter_id, period),
        threshold_marks_key(counter_id, period, subject),
        oplog_key(counter_id),
        threshold_cooldown_key(counter_id, subject),
    ]


# One update. Returns {status, old, new, crossed threshold ids, threshold marks} (the last two only
# for a counter with thresholds).
# status: OK, DUP (member already counted: nothing changes), MIN / MAX (bounds: nothing changes),
# HYDRATE (value not loaded from PostgreSQL yet: the caller hydrates and retries).
# It is the whole of UPDATE_SCRIPT, and the body of UPDATE_MANY_SCRIPT's function, whose
# parameters KEYS and ARGV shadow the globals: the update logic exists once.
#
# What the flusher needs is derived from the value hash (fields in the module docstring): the
# script writes the value hash, and marks the value as changed in the pending hash only on its
# first update since the flusher last derived it. Per-minute statistics stay exact: when an
# update opens a new minute, the closed minute's share of this value goes into the pending hash
# (once per value and minute).
_BUCKET_ADD = """
local function s(n) return string.format('%d', n) end
-- Add one value's share of a minute to a bucket field "ops delta [last max]" (last false: the
-- counter's buckets keep no last and max). Shares of one minute met twice (a clock stepping back
-- between web processes) merge: sums, the latest last, the highest max.
local function bucket_add(hkey, field, o, d, last, mx)
  local prev = redis.call('HGET', hkey, field)
  if prev then
    local po, pd, _, pm = string.match(prev, '^(%S+) (%S+) ?(%S*) ?(%S*)$')
    o, d = o + tonumber(po), d + tonumber(pd)
    if last and pm ~= '' and tonumber(pm) > mx then mx = tonumber(pm) end
  end
  local text = s(o) .. ' ' .. s(d)
  if last then text = text .. ' ' .. s(last) .. ' ' .. s(mx) end
  redis.call('HSET', hkey, field, text)
end
"""

_UPDATE_BODY = (
    _BUCKET_ADD
    + _PUBLISH_LUA
    + """
local vkey, pkey, mkey, tkey, lkey, ckey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local mode, amount, f, member = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local ms, minute = ARGV[8], ARGV[9]

if member ~= '' and redis.call('SISMEMBER', mkey, member) == 1 then
  local v = redis.call('HGET', vkey, 'v')
  if not v then return {'HYDRATE'} end
  return {'DUP', tonumber(v), tonumber(v)}
end
-- pre: the caller read these fields already (the presence script), else nil.
local h = pre or redis.call('HMGET', vkey, 'v', 'ops', 'm', 'mx')
if not h[1] then return {'HYDRATE'} end
local old = tonumber(h[1])

local delta = amount
if mode == 'set' then delta = amount - old end
local new = old + delta
if mode == 'add' then
  if ARGV[5] ~= '' and delta < 0 and new < tonumber(ARGV[5]) then return {'MIN', old, old} end
  if ARGV[6] ~= '' and delta > 0 and new > tonumber(ARGV[6]) then
    if ARGV[7] ~= '1' or old >= tonumber(ARGV[6]) then return {'MAX', old, old} end
    new = tonumber(ARGV[6])
    delta = new - old
  end
end

if member ~= '' then
  redis.call('SADD', mkey, member)
  redis.call('HSET', pkey, 'u|' .. f .. '|' .. member, '1')
end
-- Numbers go to redis.call as Lua numbers: Redis writes them with 17 significant digits, exact
-- for every value up to MAX_SAFE_VALUE (Lua's own tostring would round them to 14).
local ops, mx = tonumber(h[2]), h[4] and h[4] ~= '' and tonumber(h[4])
-- No mx: the first update since the flusher last derived this value, which marks it changed.
-- "since" and "n" (for /metrics) cost a write only then: once per value between two flushes.
if not mx then
  redis.call('HSET', pkey, 'c|' .. f, '1')
  redis.call('HSETNX', pkey, 'since', ms)
  redis.call('HINCRBY', pkey, 'n', 1)
end
if h[3] ~= minute then
  -- A new minute: the closed one's share goes to the pending hash, its highest value to the
  -- peak; the new share opens here ("ops value", and "1" if buckets keep last and max).
  local r = redis.call('HMGET', vkey, 'mb', 'f', 'peak')
  if h[3] and ops > tonumber(string.match(r[1], '^%S+')) then
    local mo, mv, last = string.match(r[1], '^(%S+) (%S+) ?(%S*)$')
    bucket_add(pkey, 'b|' .. h[3] .. '|' .. f, ops - mo, old - mv, last ~= '' and old, mx)
  end
  if mx and mx > tonumber(r[3]) then redis.call('HSET', vkey, 'peak', mx) end
  local flushed = r[2]
  if not flushed then
    -- A value hydrated before flushed levels were kept: its pending delta is still a field.
    -- Those fields are taken into the level here, so the flusher must not apply them too.
    local legacy = tonumber(redis.call('HGET', pkey, 'd|' .. f) or '0')
    local legacy_ops = tonumber(redis.call('HGET', pkey, 'o|' .. f) or '0')
    redis.call('HDEL', pkey, 'd|' .. f, 'o|' .. f, 'p|' .. f, 't|' .. f)
    flushed = s(old - legacy) .. ' ' .. s(ops - legacy_ops) .. ' 0'
  end
  local opened = s(ops) .. ' ' .. s(old) .. (ARGV[10] == '1' and ' 1' or '')
  redis.call('HSET', vkey, 'm', minute, 'mb', opened, 'f', flushed)
  mx = new
elseif not mx or new > mx then
  mx = new
end
redis.call('HSET', vkey, 'v', new, 'ops', ops + 1, 'upd', ms, 'mx', mx)
if new ~= old then publish(vkey, new, ms, f) end
if ARGV[11] ~= '' then
  redis.call('RPUSH', lkey, ARGV[11] .. ',"old":' .. s(old) .. ',"new":' .. s(new) .. '}')
end

-- Thresholds, 5 ARGV each: id, value, direction, cooldown (ms), re-arm ('1'/'0'). A mark in tkey
-- (id -> trigger ms) means "fired and not re-armed": only a crossing without a mark fires. Re-arm
-- deletes the mark when the value falls back; ckey keeps the last firing across periods for the
-- cooldown and expires by itself.
local crossed = {}
local now = tonumber(ms)
local i = 12
while i + 4 <= #ARGV do
  local tid, tv, up = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2] == 'up'
  local cooldown, rearm = tonumber(ARGV[i + 3]), ARGV[i + 4] == '1'
  if (up and old < tv and new >= tv) or (not up and old > tv and new <= tv) then
    if redis.call('HEXISTS', tkey, tid) == 0 then
      local last = cooldown > 0 and tonumber(redis.call('HGET', ckey, tid) or '0') or 0
      if last == 0 or now - last >= cooldown then
        redis.call('HSET', tkey, tid, ms)
        if cooldown > 0 then
          redis.call('HSET', ckey, tid, ms)
          if redis.call('PTTL', ckey) < cooldown then redis.call('PEXPIRE', ckey, cooldown) end
        end
        crossed[#crossed + 1] = tid
        redis.call('HSET', pkey, 'e|' .. f .. '|' .. tid .. '|' .. ms, ms)
      end
    end
  elseif rearm and ((up and new < tv) or (not up and new > tv)) then
    redis.call('HDEL', tkey, tid)
  end
  i = i + 5
end
if #ARGV < 12 then return {'OK', old, new} end
return {'OK', old, new, crossed, redis.call('HGETALL', tkey)}
"""
)

# Idempotency-Key: a prologue and epilogue around one update, in the same atomic call, so there is
# no window between "key seen" and "update applied". ``idempotent(K, A, ikey, fp, ttl, at)``: if
# the record ``ikey`` exists, nothing runs: it answers {'REPLAY', record} when the record is of
# the same request (fingerprint ``fp``), else {'CONFLICT'}. Otherwise the update runs and, unless
# it asked for hydration (nothing happened yet), its reply is recorded with the reply time ``at``
# (ms) for ``ttl`` ms. A record: ``fp|at|status|old|new|crossed ids|threshold marks`` (lists
# comma-separated); ``idempotency_record_parse`` reads it back into the update's reply.
IDEMPOTENT_PROLOGUE = """
local function idempotent(K, A, ikey, fp, ttl, at)
  local seen = redis.call('GET', ikey)
  if seen then
    if string.sub(seen, 1, #fp + 1) ~= fp .. '|' then return {'CONFLICT'} end
    return {'REPLAY', string.sub(seen, #fp + 2)}
  end
  local r = update(K, A)
  if r[1] ~= 'HYDRATE' then
    local record = {fp, at, r[1], string.format('%d', r[2]), string.format('%d', r[3]),
                    table.concat(r[4] or {}, ','), table.concat(r[5] or {}, ',')}
    redis.call('SET', ikey, table.concat(record, '|'), 'PX', ttl)
  end
  return r
end
"""

# One round trip per update. A keyed write passes its record as a 7th key and its fingerprint,
# the record's lifetime (ms) and the reply time (ms) as the last three arguments.
UPDATE_SCRIPT = (
    "local function update(KEYS, ARGV, pre)\n"
    + _UPDATE_BODY
    + "end\n"
    + IDEMPOTENT_PROLOGUE
    + """
if #KEYS == 7 then
  local n = #ARGV
  return idempotent(KEYS, {unpack(ARGV, 1, n - 3)}, KEYS[7], ARGV[n - 2], ARGV[n - 1], ARGV[n])
end
return update(KEYS, ARGV)
"""
)

# Many updates of one counter and period (their keys share its hash tag) in one call, in order;
# the reply holds each one's UPDATE_SCRIPT reply. Within such a call only these keys and arguments
# of UPDATE_SCRIPT (0-based positions) differ from one update to the next: the value, threshold
# marks and cooldown keys (per subject); the amount, pending field, member and log entry. The
# rest (bounds, time, thresholds, ...) is sent once, which halves what a batch sends and packs.
UPDATE_OWN_KEYS = (0, 3, 5)
UPDATE_OWN_ARGS = (1, 2, 3, 10)
_OWN_KEYS_LUA, _OWN_ARGS_LUA = (", ".join(str(i + 1) for i in own) for own in (UPDATE_OWN_KEYS, UPDATE_OWN_ARGS))
# KEYS: the first update's keys, then each update's own keys. ARGV: how many keys and arguments
# the first update has, whether the updates carry idempotency keys ('1'/'0'), the records'
# lifetime (ms), the reply time (ms), the first update's arguments, then each update's own
# arguments. With idempotency keys each update's own keys end with its record and its own
# arguments with its fingerprint ('' for an update without a key: its record key is a
# placeholder in the slot, never touched).
UPDATE_MANY_SCRIPT = (
    "local function update(KEYS, ARGV, pre)\n"
    + _UPDATE_BODY
    + "end\n"
    + IDEMPOTENT_PROLOGUE
    + f"""
local own_keys, own_args = {{{_OWN_KEYS_LUA}}}, {{{_OWN_ARGS_LUA}}}
local nk, na, keyed, ttl, at = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3] == '1', ARGV[4], ARGV[5]
local K, A = {{unpack(KEYS, 1, nk)}}, {{unpack(ARGV, 6, 5 + na)}}
local step_k, step_a = #own_keys, #own_args
if keyed then step_k, step_a = step_k + 1, step_a + 1 end
local results, k, a = {{}}, nk, 5 + na
while k < #KEYS do
  for j = 1, #own_keys do K[own_keys[j]] = KEYS[k + j] end
  for j = 1, #own_args do A[own_args[j]] = ARGV[a + j] end
  local fp = keyed and ARGV[a + step_a] or ''
  if fp ~= '' then
    results[#results + 1] = idempotent(K, A, KEYS[k + step_k], fp, ttl, at)
  else
    results[#results + 1] = update(K, A)
  end
  k, a = k + step_k, a + step_a
end
return results
"""
)

# Load a value from PostgreSQL into Redis unless it is already there (a concurrent hydration won).
# ARGV: value, peak, operations, last update (ms), PostgreSQL's flush version of the row, and the
# time (ms) of the period's last manual reset or ''.
HYDRATE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'peak', ARGV[2], 'ops', ARGV[3], 'upd', ARGV[4],
  'f', ARGV[1] .. ' ' .. ARGV[3] .. ' ' .. ARGV[5])
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'rst', ARGV[6]) end
return 1
"""

# The field of a value hash that holds the time (ms) of the period's last manual reset.
LAST_RESET_FIELD = "rst"

# Move what is pending into a batch with an id (flusher). KEYS: pend, log, batches, batch, batch log.
MOVE_PENDING_SCRIPT = """
local moved = 0
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('RENAME', KEYS[1], KEYS[4]); moved = 1 end
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('RENAME', KEYS[2], KEYS[5]); moved = 1 end
if moved == 1 then redis.call('SADD', KEYS[3], ARGV[1]) end
return moved
"""

# Turn changed values' marks (``c|<period>|<subject>`` = '1') of a moved batch into what PostgreSQL
# has to apply: "delta ops peak updated version [minute ops delta [last max]]". Delta and ops are
# what the value gained since the last derivation (value and ops minus those in ``f``); version
# is ``f``'s + 1, and PostgreSQL applies the row only if its own row is still at ``f``'s version
# (see counters_flush); the rest is the value's share of its open statistics minute. Each value
# is derived atomically with its updates: an update lands either in this batch or marks the value
# in the next one (until its derivation the value keeps ``mx``, so its updates add no new mark).
# A mark derived already is not derived again (a flusher that died halfway runs this again): its
# row is answered as it was written, so a flusher that read the batch before another one derived
# it still applies every row. Called in chunks so that Redis never stops for a whole large batch.
# KEYS: batch, then the value hash of each mark (declared, so that a Redis Cluster routes and
# checks them: all in the counter's slot). ARGV: marks. Returns mark, row per mark whose value has
# a row (a value whose hash is gone has none: its mark is dropped).
DERIVE_SCRIPT = """
local function s(n) return string.format('%d', n) end
local out = {}
for i = 1, #ARGV do
  local field = ARGV[i]
  local mark = redis.call('HGET', KEYS[1], field)
  if mark and mark ~= '1' then
    out[#out + 1] = field; out[#out + 1] = mark
  elseif mark then
    local vkey = KEYS[i + 1]
    local h = redis.call('HMGET', vkey, 'v', 'peak', 'ops', 'upd', 'f', 'm', 'mb', 'mx')
    if h[1] and h[5] then
      local fv, fo, fn = string.match(h[5], '^(%S+) (%S+) (%S+)$')
      local v, ops, version = tonumber(h[1]), tonumber(h[3]), tonumber(fn) + 1
      local peak, mx = tonumber(h[2]), h[8] and h[8] ~= '' and tonumber(h[8])
      if mx and mx > peak then peak = mx end
      local row = s(v - fv) .. ' ' .. s(ops - fo) .. ' ' .. s(peak) .. ' ' .. h[4] .. ' ' .. s(version)
      local opened = h[3] .. ' ' .. h[1]
      if h[6] then
        local mo, mv, last = string.match(h[7], '^(%S+) (%S+) ?(%S*)$')
        if ops > tonumber(mo) then
          row = row .. ' ' .. h[6] .. ' ' .. s(ops - mo) .. ' ' .. s(v - mv)
          if last ~= '' then row = row .. ' ' .. h[1] .. ' ' .. s(mx or v) end
        end
        if last ~= '' then opened = opened .. ' 1' end
      end
      redis.call('HSET', KEYS[1], field, row)
      redis.call('HSET', vkey, 'f', h[1] .. ' ' .. h[3] .. ' ' .. s(version), 'mb', opened, 'peak', peak, 'mx', '')
      out[#out + 1] = field; out[#out + 1] = row
    else
      redis.call('HDEL', KEYS[1], field)
    end
  end
end
return out
"""

# Forget a batch once PostgreSQL has it. KEYS: batches, batch, batch log.
DROP_BATCH_SCRIPT = """
redis.call('DEL', KEYS[2], KEYS[3])
return redis.call('SREM', KEYS[1], ARGV[1])
"""

# Rebase a value's Redis copy on PostgreSQL: value := PostgreSQL value + what Redis has not moved
# to a batch yet (value minus ``f``'s value); ``f`` := PostgreSQL's value and version.
# Used after an outage during which PostgreSQL was written directly, and after a flush refused a
# value whose Redis copy had lost its place (a restored snapshot). Refused (0) while a flush batch
# is in flight, because PostgreSQL may or may not contain it yet. The caller holds the PostgreSQL
# row lock, so no flush can change the row meanwhile.
# KEYS: value, batches, pend. ARGV: PostgreSQL value, PostgreSQL version, the value's field.
REBASE_SCRIPT = (
    _PUBLISH_LUA
    + """
if redis.call('SCARD', KEYS[2]) > 0 then return 0 end
local h = redis.call('HMGET', KEYS[1], 'v', 'f', 'mb', 'mx', 'peak', 'ops')
if not h[1] then return 1 end
local function s(n) return string.format('%d', n) end
local v, base = tonumber(h[1]), tonumber(ARGV[1])
local fv, fo
if h[2] then
  fv, fo = string.match(h[2], '^(%S+) (%S+)')
else
  -- A value hydrated before flushed levels were kept has its unflushed delta in a pending field.
  fv = v - tonumber(redis.call('HGET', KEYS[3], 'd|' .. ARGV[3]) or '0')
  fo = h[6]
  redis.call('HDEL', KEYS[3], 'd|' .. ARGV[3], 'o|' .. ARGV[3], 'p|' .. ARGV[3], 't|' .. ARGV[3])
end
local shift = base - tonumber(fv)
redis.call('HSET', KEYS[1], 'v', s(v + shift), 'f', ARGV[1] .. ' ' .. fo .. ' ' .. ARGV[2])
if h[3] then
  local mo, mv, last = string.match(h[3], '^(%S+) (%S+)( ?%S*)$')
  redis.call('HSET', KEYS[1], 'mb', mo .. ' ' .. s(mv + shift) .. last)
end
if h[4] and h[4] ~= '' then redis.call('HSET', KEYS[1], 'mx', s(tonumber(h[4]) + shift)) end
if v + shift > tonumber(h[5] or '0') then redis.call('HSET', KEYS[1], 'peak', s(v + shift)) end
if shift ~= 0 then publish(KEYS[1], v + shift, redis.call('HGET', KEYS[1], 'upd') or '0', ARGV[3]) end
return 1
"""
)

# Delete the keys of a closed period (KEYS[3..]) only if nothing of that period waits for the
# flusher: no field of ARGV[1] (the period) in the pending hash (KEYS[1]) and no batch in flight
# (KEYS[2]). Atomic with updates, so a delta can never be left behind; -1 means "not yet".
TRIM_PERIOD_SCRIPT = """
if redis.call('SCARD', KEYS[2]) > 0 then return -1 end
local needle = '|' .. ARGV[1] .. '|'
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.find(field, needle, 1, true) then return -1 end
end
local deleted = 0
for i = 3, #KEYS do deleted = deleted + redis.call('DEL', KEYS[i]) end
return deleted
"""


def idempotency_record_parse(record: bytes) -> tuple[int, list]:
    """``(reply time in ms, the update's reply)`` of a record written by ``IDEMPOTENT_PROLOGUE``
    (without its fingerprint, as the script answers it): the reply has the update script's shape."""
    at, status, old, new, crossed, marks = record.split(b"|")
    reply = [status, int(old), int(new)]
    if status == b"OK":
        reply += [crossed.split(b",") if crossed else [], marks.split(b",") if marks else []]
    return int(at), reply


def presence_keys(counter_id: int, period: str) -> list[str]:
    """PRESENCE_SCRIPT's keys: UPDATE_SCRIPT's (subject empty), then the lease keys.

    The lease keys belong to the counter, not to a period: leases, users, a user's sessions, nodes,
    the leases on each node and each lease's node.
    """
    tag = _tag(counter_id)
    leases = [f"{tag}:ps", f"{tag}:pu", f"{tag}:px", f"{tag}:pn", f"{tag}:pnm", f"{tag}:psn"]
    return update_keys(counter_id, period, "") + leases


# Presence leases (docs/presence.md). Every call first drops what has lapsed at ``now`` (ARGV[2],
# the service's clock, never Redis TIME, so tests can move it): lapsed nodes with every lease
# they carry, then lapsed leases. Then it applies the operation to each (user, session, node)
# item: 'in' (login) and 'hb' (heartbeat) open or renew a lease until now + lease, or, given a
# node (now or before), for as long as that node's lease, which they renew; a node alone renews
# the node; 'out' (logout) closes the session, or every session of the user if none is given;
# 'read' only sweeps. The count (users or sessions) is then written to the value hash through
# the update body ('set', so the flusher, peak, stats buckets and thresholds see it like any
# other change); a heartbeat or read that changed nothing writes nothing.
# A user's sessions are indexed (``px``) only when they have an id: a logout of every session
# drops the lease without a session by its name (entries of such leases that ``px`` still holds
# from before go with their lease).
# KEYS: presence_keys. ARGV: op, now ms, its minute, lease ms, 'users'/'sessions', pending field,
# log entry, number of thresholds, 5 arguments per threshold (as UPDATE_SCRIPT), then the items
# as user, session, node triples (the moment side by side, and the items last: the fast lane packs
# a login's call once per window: presence.MOMENT_ARG). Returns UPDATE_SCRIPT's reply, or
# {'HYDRATE'} before any change (a value hash always holds its 'v' once hydrated).
PRESENCE_SCRIPT = (
    "local function update(KEYS, ARGV, pre)\n"
    + _UPDATE_BODY
    + """end

local vkey = KEYS[1]
local skey, ukey, xkey, nkey, nmkey, snkey = KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11], KEYS[12]
local op, ms, minute, lease, counts = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local now = tonumber(ms)
local first_item = 9 + 5 * tonumber(ARGV[8])
-- The leases never touch the value hash: it is read here, once. A login or logout always writes the
-- count, so it reads what the update body reads too; a heartbeat or read seldom changes it.
local writes = op == 'in' or op == 'out'
local h = writes and redis.call('HMGET', vkey, 'v', 'ops', 'm', 'mx') or {redis.call('HGET', vkey, 'v')}
if not h[1] then return {'HYDRATE'} end
local old = tonumber(h[1])

local function drop(lease_id)
  if redis.call('ZREM', skey, lease_id) == 0 then return end
  redis.call('ZREM', xkey, lease_id)
  local user = string.match(lease_id, '^[^|]*')
  if redis.call('HINCRBY', ukey, user, -1) <= 0 then redis.call('HDEL', ukey, user) end
  local node = redis.call('HGET', snkey, lease_id)
  if node then
    redis.call('HDEL', snkey, lease_id)
    redis.call('ZREM', nmkey, node .. '|' .. lease_id)
  end
end

-- Names never contain '|' or '}', so '[x|' .. '(x}' ranges exactly the entries starting 'x|'.
local function starting(key, prefix)
  return redis.call('ZRANGEBYLEX', key, '[' .. prefix .. '|', '(' .. prefix .. '}')
end

for _, node in ipairs(redis.call('ZRANGEBYSCORE', nkey, '-inf', now)) do
  for _, entry in ipairs(starting(nmkey, node)) do drop(string.sub(entry, #node + 2)) end
  redis.call('ZREM', nkey, node)
end
for _, lease_id in ipairs(redis.call('ZRANGEBYSCORE', skey, '-inf', now)) do drop(lease_id) end

local expiry = now + lease
local i = first_item
while i + 2 <= #ARGV do
  local user, session, node = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if op == 'out' then
    if session ~= '' then
      drop(user .. '|' .. session)
    else
      for _, lease_id in ipairs(starting(xkey, user)) do drop(lease_id) end
      drop(user .. '|')
    end
  elseif op ~= 'read' then
    if node ~= '' then redis.call('ZADD', nkey, expiry, node) end
    if user ~= '' then
      local lease_id = user .. '|' .. session
      -- A login mostly opens a lease: that is tried first, in one call.
      local added = op == 'in' and node == '' and redis.call('ZADD', skey, 'NX', expiry, lease_id) == 1
      local old_node
      if not added then
        old_node = redis.call('HGET', snkey, lease_id)
        -- A lease carried by a node lives as long as the node: no expiry of its own.
        local until_ms = expiry
        if node ~= '' or old_node then until_ms = '+inf' end
        added = redis.call('ZADD', skey, until_ms, lease_id) == 1
      end
      if added then
        if session ~= '' then redis.call('ZADD', xkey, 0, lease_id) end
        redis.call('HINCRBY', ukey, user, 1)
      end
      if node ~= '' and old_node ~= node then
        if old_node then redis.call('ZREM', nmkey, old_node .. '|' .. lease_id) end
        redis.call('HSET', snkey, lease_id, node)
        redis.call('ZADD', nmkey, 0, node .. '|' .. lease_id)
      end
    end
  end
  i = i + 3
end

local new
if counts == 'sessions' then new = redis.call('ZCARD', skey) else new = redis.call('HLEN', ukey) end
if op ~= 'in' and op ~= 'out' and new == old then return {'OK', old, new, {}, {}} end
local A = {'set', string.format('%d', new), ARGV[6], '', '', '', '0', ms, minute, '1', ARGV[7]}
for j = 9, first_item - 1 do A[#A + 1] = ARGV[j] end
return update({KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]}, A, writes and h or nil)
"""
)

"""Every Redis key name of the counter store and the Lua scripts that touch them.

Nothing else in the project spells a key. All keys of one counter share the hash tag
``{c<id>}`` so that a script only ever touches one Redis Cluster slot.

Per counter ``c``:

- ``cs:{c}:v:<period>:<subject>`` hash: ``v`` value, ``peak``, ``ops``, ``upd`` (ms), ``rst`` (ms of
  the last manual reset in the period, if any: what ``lastResetTime`` shows). Its existence
  means "hydrated from PostgreSQL"; the update script refuses to run on a missing one.
- ``cs:{c}:m:<period>`` set: members already counted in the period (unique counters).
- ``cs:{c}:t:<period>:<subject>`` hash: threshold id -> time (ms) it fired in the period (deleted
  when a re-arming threshold falls back).
- ``cs:{c}:tc:<subject>`` hash: threshold id -> last firing (ms), for cooldowns; it expires when
  the longest running cooldown ends.
- ``cs:{c}:pend`` hash: what the flusher still has to write to PostgreSQL, fields
  ``d|<period>|<subject>`` delta, ``o|…`` operations, ``p|…`` peak, ``t|…`` last update (ms),
  ``u|<period>||<member>`` new unique member, ``e|<period>|<subject>|<threshold id>|<ms>`` crossing,
  ``bo|<minute>`` / ``bd|<minute>`` / ``bv|<minute>`` / ``bm|<minute>`` per-minute stats.
- ``cs:{c}:log`` list: operation-log entries (JSON) for counters that log operations.
- ``cs:{c}:ik:<app id>:<Idempotency-Key>`` string: what the update script answered to the write
  that first used that key (see ``IDEMPOTENT_PROLOGUE``); it expires after the key's lifetime.
- ``cs:{c}:batches`` set of batch ids moved out of ``pend``/``log`` and not yet deleted;
  ``cs:{c}:b:<id>`` / ``cs:{c}:bl:<id>`` hold one batch.

The value hashes, member sets and threshold marks of a closed period are deleted by the archive
task (``TRIM_PERIOD_SCRIPT``) once nothing of that period is pending; every key of a deleted
counter by the flush task (``cs:deleted`` queues them).

Global: ``cs:cfg:gen`` (config generation, bumped on every config change), ``cs:lock:<name>`` and
``cs:deleted`` (deleted counters whose keys are still to be dropped).
"""

PREFIX = "cs"

# Values are exact integers in JavaScript's safe range; Lua (doubles) compares them exactly too.
MAX_SAFE_VALUE = 2**53 - 1


def _tag(counter_id: int) -> str:
    return f"{PREFIX}:{{c{counter_id}}}"


def value_key(counter_id: int, period: str, subject: str) -> str:
    return f"{_tag(counter_id)}:v:{period}:{subject}"


def members_key(counter_id: int, period: str) -> str:
    return f"{_tag(counter_id)}:m:{period}"


def threshold_marks_key(counter_id: int, period: str, subject: str) -> str:
    return f"{_tag(counter_id)}:t:{period}:{subject}"


def threshold_cooldown_key(counter_id: int, subject: str) -> str:
    return f"{_tag(counter_id)}:tc:{subject}"


def pending_key(counter_id: int) -> str:
    return f"{_tag(counter_id)}:pend"


def oplog_key(counter_id: int) -> str:
    return f"{_tag(counter_id)}:log"


def batches_key(counter_id: int) -> str:
    return f"{_tag(counter_id)}:batches"


def batch_key(counter_id: int, batch_id: str) -> str:
    return f"{_tag(counter_id)}:b:{batch_id}"


def batch_log_key(counter_id: int, batch_id: str) -> str:
    return f"{_tag(counter_id)}:bl:{batch_id}"


def counter_keys_pattern(counter_id: int) -> str:
    return f"{_tag(counter_id)}:*"


# Matches every period-scoped key (value hashes, member sets, threshold marks) of every counter.
PERIOD_SCOPED_KEYS_PATTERN = f"{PREFIX}:{{c*}}:[vmt]:*"


def _counter_id_of_tag(tag: str) -> int | None:
    """The id in a hash tag made by ``_tag`` (``{c<id>}``), else None."""
    if tag.startswith("{c") and tag.endswith("}") and tag[2:-1].isdigit():
        return int(tag[2:-1])
    return None


def period_scoped_key_parts(key: str) -> tuple[int, str] | None:
    """``(counter id, period)`` of a key matched by ``PERIOD_SCOPED_KEYS_PATTERN``, else None."""
    parts = key.split(":", 3)
    if len(parts) != 4 or parts[0] != PREFIX or parts[2] not in ("v", "m", "t"):
        return None
    counter_id = _counter_id_of_tag(parts[1])
    return None if counter_id is None else (counter_id, parts[3].split(":", 1)[0])


CONFIG_GENERATION_KEY = f"{PREFIX}:cfg:gen"

# Counters deleted from PostgreSQL whose keys are still to be dropped: sorted set, id -> deletion ms.
DELETED_COUNTERS_KEY = f"{PREFIX}:deleted"
ALL_COUNTER_KEYS_PATTERN = f"{PREFIX}:{{c*"


def counter_id_of_key(key: bytes | str) -> int | None:
    """The counter id in a key of ``ALL_COUNTER_KEYS_PATTERN`` (None for anything else)."""
    parts = (key.decode() if isinstance(key, bytes) else key).split(":", 2)
    return _counter_id_of_tag(parts[1]) if len(parts) > 1 and parts[0] == PREFIX else None


def idempotency_key(counter_id: int, app_id: int | None, key: str) -> str:
    """The record of an Idempotency-Key: in the counter's slot (one script, one Cluster slot),
    per app (the caller's), so apps sharing a global counter never see each other's keys."""
    return f"{_tag(counter_id)}:ik:{app_id or 0}:{key}"


def lock_key(name: str) -> str:
    return f"{PREFIX}:lock:{name}"


def pending_delta_field(period: str, subject: str) -> str:
    return f"d|{period}|{subject}"


def update_keys(counter_id: int, period: str, subject: str) -> list[str]:
    return [
        value_key(counter_id, period, subject),
        pending_key(counter_id),
        members_key(counter_id, period),
        threshold_marks_key(counter_id, period, subject),
        oplog_key(counter_id),
        threshold_cooldown_key(counter_id, subject),
    ]


# One update. Returns {status, old, new, crossed threshold ids, threshold marks}.
# status: OK, DUP (member already counted: nothing changes), MIN / MAX (bounds: nothing changes),
# HYDRATE (value not loaded from PostgreSQL yet: the caller hydrates and retries).
# It is the whole of UPDATE_SCRIPT, and the body of UPDATE_MANY_SCRIPT's function, whose
# parameters KEYS and ARGV shadow the globals: the update logic exists once.
_UPDATE_BODY = """
local vkey, pkey, mkey, tkey, lkey, ckey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local mode, amount, f, member = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local ms, minute = ARGV[8], ARGV[9]
local function s(n) return string.format('%d', n) end

if redis.call('EXISTS', vkey) == 0 then return {'HYDRATE'} end
local old = tonumber(redis.call('HGET', vkey, 'v'))
if member ~= '' and redis.call('SISMEMBER', mkey, member) == 1 then return {'DUP', old, old} end

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
new = redis.call('HINCRBY', vkey, 'v', s(delta))
redis.call('HINCRBY', vkey, 'ops', 1)
local peak = tonumber(redis.call('HGET', vkey, 'peak'))
if new > peak then peak = new; redis.call('HSET', vkey, 'peak', s(peak)) end
redis.call('HSET', vkey, 'upd', ms)

redis.call('HINCRBY', pkey, 'd|' .. f, s(delta))
redis.call('HINCRBY', pkey, 'o|' .. f, 1)
redis.call('HSET', pkey, 'p|' .. f, s(peak), 't|' .. f, ms)
redis.call('HINCRBY', pkey, 'bo|' .. minute, 1)
redis.call('HINCRBY', pkey, 'bd|' .. minute, s(delta))
if ARGV[10] == '1' then
  redis.call('HSET', pkey, 'bv|' .. minute, s(new))
  local bm = redis.call('HGET', pkey, 'bm|' .. minute)
  if not bm or tonumber(bm) < new then redis.call('HSET', pkey, 'bm|' .. minute, s(new)) end
end
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
local marks = {}
if #ARGV >= 12 then marks = redis.call('HGETALL', tkey) end
return {'OK', old, new, crossed, marks}
"""

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
    "local function update(KEYS, ARGV)\n"
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
    "local function update(KEYS, ARGV)\n"
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
# ARGV[5]: the time (ms) of the period's last manual reset, or ''.
HYDRATE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'peak', ARGV[2], 'ops', ARGV[3], 'upd', ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'rst', ARGV[5]) end
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

# Forget a batch once PostgreSQL has it. KEYS: batches, batch, batch log.
DROP_BATCH_SCRIPT = """
redis.call('DEL', KEYS[2], KEYS[3])
return redis.call('SREM', KEYS[1], ARGV[1])
"""

# Correct a value Redis kept through an outage during which PostgreSQL was written directly:
# Redis value := PostgreSQL value + what Redis has not flushed yet. Refused (0) while a flush
# batch is in flight, because PostgreSQL may or may not contain it yet. The caller holds the
# PostgreSQL row lock, so no flush can change the row meanwhile.
# KEYS: value, pend, batches. ARGV: PostgreSQL value, pending delta field.
RECONCILE_SCRIPT = """
if redis.call('SCARD', KEYS[3]) > 0 then return 0 end
if redis.call('EXISTS', KEYS[1]) == 0 then return 1 end
local v = tonumber(ARGV[1]) + tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0')
redis.call('HSET', KEYS[1], 'v', string.format('%d', v))
if v > tonumber(redis.call('HGET', KEYS[1], 'peak') or '0') then
  redis.call('HSET', KEYS[1], 'peak', string.format('%d', v))
end
return 1
"""

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

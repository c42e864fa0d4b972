-- counters/keyspace.py's PRESENCE_SCRIPT before the ninth session (commit 1acd40d): the fixed baseline of
-- bench/presence_script_bench.py. Not used by the service.
local function update(KEYS, ARGV)

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

local function publish(vkey, value, ms, field)
  redis.call('SPUBLISH', string.sub(vkey, 1, string.find(vkey, '}', 1, true)) .. ':ev',
    string.format('%d', value) .. ' ' .. ms .. ' ' .. field)
end

local vkey, pkey, mkey, tkey, lkey, ckey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local mode, amount, f, member = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local ms, minute = ARGV[8], ARGV[9]

if member ~= '' and redis.call('SISMEMBER', mkey, member) == 1 then
  local v = redis.call('HGET', vkey, 'v')
  if not v then return {'HYDRATE'} end
  return {'DUP', tonumber(v), tonumber(v)}
end
local h = redis.call('HMGET', vkey, 'v', 'ops', 'm', 'mx')
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
end

local vkey = KEYS[1]
local skey, ukey, xkey, nkey, nmkey, snkey = KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11], KEYS[12]
local op, ms, minute, lease, counts = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local now = tonumber(ms)
local first_item = 9 + 5 * tonumber(ARGV[8])
-- The leases never touch the value hash: its count before them is read here, once.
local old = redis.call('HGET', vkey, 'v')
if not old then return {'HYDRATE'} end
old = tonumber(old)

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
    end
  elseif op ~= 'read' then
    if node ~= '' then redis.call('ZADD', nkey, expiry, node) end
    if user ~= '' then
      local lease_id = user .. '|' .. session
      local old_node = redis.call('HGET', snkey, lease_id)
      -- A lease carried by a node lives as long as the node: no expiry of its own.
      local until_ms = expiry
      if node ~= '' or old_node then until_ms = '+inf' end
      if redis.call('ZADD', skey, until_ms, lease_id) == 1 then
        redis.call('ZADD', xkey, 0, lease_id)
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
return update({KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]}, A)

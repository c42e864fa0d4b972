-- The update script as it was before the store redesign (issue 18 item 7): the baseline of
-- bench/script_bench.py. Not used by the service.
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

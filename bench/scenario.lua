-- wrk script for every bench scenario; run.py sets it up through the environment:
--   BENCH_BODY   none | increment | keyed | dau | batch | heartbeat | heartbeats   (what each request
--                carries; keyed: an increment with a new Idempotency-Key per request; heartbeat: one user
--                of a pool of 10,000 per thread, heartbeats: BENCH_BATCH_SIZE of them)
--   BENCH_METHOD GET | POST,  BENCH_KEY  the API key,  BENCH_RUN  a tag that keeps user ids distinct across runs
--   BENCH_DELAY_MS  mean pause after each response, drawn uniformly from 0 to twice it (fixed-rate
--                runs: rate ~ connections / mean pause)
-- done() prints one line "BENCH {json}" with the figures run.py reads.

local body_kind = os.getenv("BENCH_BODY") or "none"
local method = os.getenv("BENCH_METHOD") or "GET"
local key = os.getenv("BENCH_KEY") or ""
local run_tag = os.getenv("BENCH_RUN") or "r"
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
local batch_size = tonumber(os.getenv("BENCH_BATCH_SIZE") or "100")

local threads = {}
local thread_id = 0

function setup(thread)
  thread_id = thread_id + 1
  thread:set("tid", thread_id)
  table.insert(threads, thread)
end

local headers = { ["Content-Type"] = "application/json" }
if key ~= "" then headers["Authorization"] = "Bearer " .. key end

sent, ok = 0, 0

local function next_user()
  return string.format("%s-%d-%d", run_tag, tid, sent)
end

local function batch_body()
  -- Half games played, a quarter plain increments (bench_0), a quarter distinct daily active users.
  local items = {}
  local games, plain = math.floor(batch_size / 2), math.floor(batch_size / 4)
  for _ = 1, games do items[#items + 1] = '{"name":"total_games_played"}' end
  for _ = 1, plain do items[#items + 1] = '{"name":"bench_0","op":"increment","value":1}' end
  for i = 1, batch_size - games - plain do
    items[#items + 1] = string.format('{"name":"daily_active_users","user_id":"%s-%d"}', next_user(), i)
  end
  return '{"updates":[' .. table.concat(items, ",") .. "]}"
end

function request()
  sent = sent + 1
  local body = nil
  if body_kind == "increment" then
    body = '{"value":1}'
  elseif body_kind == "keyed" then
    body = '{"value":1}'
    headers["Idempotency-Key"] = string.format("%s-%d-%d", run_tag, tid, sent)
  elseif body_kind == "dau" then
    body = '{"user_id":"' .. next_user() .. '"}'
  elseif body_kind == "batch" then
    body = batch_body()
  elseif body_kind == "heartbeat" then
    body = string.format('{"user_id":"%s-%d-%d"}', run_tag, tid, sent % 10000)
  elseif body_kind == "heartbeats" then
    local ids, first = {}, (sent * batch_size) % 10000
    for i = 1, batch_size do ids[i] = string.format('"%s-%d-%d"', run_tag, tid, (first + i) % 10000) end
    body = '{"user_ids":[' .. table.concat(ids, ",") .. '],"node_id":"' .. run_tag .. '-' .. tid .. '"}'
  end
  return wrk.format(method, nil, headers, body)
end

function response(status, _, _)
  if status >= 200 and status < 300 then ok = ok + 1 end
end

if delay_ms > 0 then
  -- A pause drawn between 0 and twice the mean, not the mean itself: with the same pause on every
  -- connection, the connections answered in one loop turn of the server all came back together
  -- 10 ms later, and a run at 57 % of peak measured those bursts (a 5-8 ms P50 with the server's
  -- core half idle, bench/README.md) instead of a steady rate's latency.
  function delay()
    return math.random(0, 2 * delay_ms)
  end
end

function done(summary, latency, _)
  local total_sent, total_ok = 0, 0
  for _, thread in ipairs(threads) do
    total_sent = total_sent + thread:get("sent")
    total_ok = total_ok + thread:get("ok")
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"sent":%d,"ok":%d,"errors":%d,"non2xx":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, total_sent, total_ok, e.connect + e.read + e.write + e.timeout, e.status))
end

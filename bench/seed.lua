-- wrk script of make bench-seed: the seed's increment with an API key (SEED_KEY), POST to the URL given.
--   SEED_BODY=login (default): {"user_id":"<SEED_RUN>-<thread>-<n>"}, a user never seen before per
--     request: online_players is a presence counter, each increment is a login that opens a lease.
--   SEED_BODY=increment: {"value":1}, the seed's body as written (a plain counter, and the reference).
-- done() prints "SEED {json}" with the requests each thread sent and the 2xx it saw (seed.py's window check).
local body_kind = os.getenv("SEED_BODY") or "login"
local run_tag = os.getenv("SEED_RUN") or "seed"

wrk.method = "POST"
wrk.body = '{"value":1}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("SEED_KEY") or "")

local threads = {}
local thread_id = 0

function setup(thread)
  thread_id = thread_id + 1
  thread:set("tid", thread_id)
  table.insert(threads, thread)
end

sent, ok = 0, 0

function request()
  sent = sent + 1
  if body_kind == "login" then
    return wrk.format(nil, nil, nil, string.format('{"user_id":"%s-%d-%d"}', run_tag, tid, sent))
  end
  return wrk.format()
end

function response(status, _, _)
  if status >= 200 and status < 300 then ok = ok + 1 end
end

function done(_, _, _)
  local total_sent, total_ok = 0, 0
  for _, thread in ipairs(threads) do
    total_sent = total_sent + thread:get("sent")
    total_ok = total_ok + thread:get("ok")
  end
  io.write(string.format('SEED {"sent":%d,"ok":%d}\n', total_sent, total_ok))
end

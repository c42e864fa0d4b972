-- wrk script of make bench-seed: the seed's increment, POST {"value":1} with an API key (SEED_KEY).
wrk.method = "POST"
wrk.body = '{"value":1}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("SEED_KEY") or "")

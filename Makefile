# make run   — set up on a fresh machine and run web + worker + beat on 127.0.0.1:$(PORT)
# make test  — the same set-up, then ruff and the whole test suite, then the core suites against a Redis Cluster
# make test-cluster — the core suites against a Redis Cluster of 3 primaries + 3 replicas started on free ports
# make cluster / make cluster-stop — a Redis Cluster on loopback ports 7000-7005 for development (docs/cluster.md)
# make test-midnight — the same with every test's clock starting at 23:59:30 UTC (tests/clock.py)
# make bench — the hot endpoints next to a DRF baseline, latency below saturation, exactness, outages (bench/README.md)
# make bench-seed — the seed's wrk command against make run's processes, beside a raw reference (bench/README.md)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8080
export PORT

.PHONY: run test test-cluster cluster cluster-stop bench-cluster test-midnight lint format services browser prometheus migrate bench bench-seed soak clean

$(BIN)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

services:
	bash scripts/ensure-services.sh

migrate: $(BIN)/.installed services
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py setup_schedules
	$(BIN)/python manage.py collectstatic --noinput --verbosity 0

# web and worker share one directory for their Prometheus metrics (docs/metrics.md).
run: migrate
	mkdir -p .metrics-multiproc
	PROMETHEUS_MULTIPROC_DIR="$(abspath .metrics-multiproc)" PATH="$(abspath $(BIN)):$$PATH" $(BIN)/honcho start -f Procfile

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(BIN)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The console's browser tests drive Debian's Chromium (never a browser downloaded by Playwright).
browser:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

# The metrics tests scrape a live instance with Debian's Prometheus (and check the rules with promtool).
prometheus:
	command -v prometheus >/dev/null && command -v promtool >/dev/null || (apt-get update && apt-get install -y prometheus)

test: $(BIN)/.installed services browser prometheus lint
	$(BIN)/pytest $(PYTEST_ARGS)
	$(MAKE) test-cluster

# The core suites (REST v1, cloud functions, flush exactly-once, periods, thresholds, Redis down,
# batch updates, idempotency, archive, presence, fast lane, server-sent events) once more with a
# Redis Cluster as the hot store, plus the cluster's own tests (kill -9 of a primary under load). Tests that drive a single private Redis skip.
CLUSTER_SUITES ?= tests/test_cluster.py tests/test_rest_v1.py tests/test_functions.py tests/test_core_durability.py \
	tests/test_flush_copy.py tests/test_periods.py tests/test_thresholds.py tests/test_failure_modes.py \
	tests/test_reliability.py tests/test_batch_update.py tests/test_idempotency.py tests/test_archive.py \
	tests/test_presence.py tests/test_presence_api.py tests/test_fast_lane.py tests/test_streams.py tests/test_split.py
test-cluster: $(BIN)/.installed services
	TEST_REDIS_CLUSTER=1 $(BIN)/pytest $(CLUSTER_SUITES) $(PYTEST_ARGS)

cluster:
	bash scripts/redis-cluster.sh start

cluster-stop:
	bash scripts/redis-cluster.sh stop

# Each test starts at TEST_CLOCK_UTC (time-machine, in-process and in the Python processes it
# starts): a test that leans on the real clock's day fails here rather than at 00:00 in CI.
TEST_CLOCK_UTC ?= 23:59:30
test-midnight:
	TEST_CLOCK_UTC=$(TEST_CLOCK_UTC) $(MAKE) test

bench: $(BIN)/.installed services
	command -v wrk >/dev/null && command -v hey >/dev/null || (apt-get update && apt-get install -y wrk hey)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/flush_bench.py
	$(BIN)/python bench/outage.py
	$(BIN)/python bench/script_bench.py
	$(BIN)/python bench/presence_script_bench.py
	$(BIN)/python bench/presence_bench.py

# The update script on one Redis against a Redis Cluster of 3 primaries + 3 replicas, same run (bench/README.md).
bench-cluster: $(BIN)/.installed
	$(BIN)/python bench/cluster_bench.py

# The seed's wrk -t12 -c400 -d30s against make run's processes, beside a raw reference handler.
bench-seed: $(BIN)/.installed services
	command -v wrk >/dev/null && command -v hey >/dev/null || (apt-get update && apt-get install -y wrk hey)
	$(BIN)/python bench/seed.py

# The long memory soak (bench/README-soak.md), with a redis-server and a database of its own.
SOAK_DATABASE_URL ?= postgres://root@127.0.0.1:5432/counters_soak
SOAK_ARGS ?= --duration 7200 --warmup 600 --clients 4 --trace-dir .soak-trace
soak: $(BIN)/.installed services
	$(BIN)/python bench/soak.py --private-redis --database-url $(SOAK_DATABASE_URL) $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

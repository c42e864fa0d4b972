"""A live instance (gunicorn with two workers, a Celery worker) scraped by a real Prometheus.

Every query of the Grafana dashboard and every alert rule must return data through Prometheus's
HTTP API; the counts must match the work done across both web workers, also after one is killed.
"""

import json
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
import requests
from prometheus_client.multiprocess import MultiProcessCollector

from alerts.models import Channel
from archive.tasks import close_periods
from counters.models import App, Counter, Threshold
from counters.tasks import flush

from .metrics_text import sample, total
from .processes import ROOT, CeleryWorker, Gunicorn, free_port, wait_until

P = "counterservice"
DASHBOARD = ROOT / "monitoring" / "grafana-dashboard.json"
RULES = ROOT / "monitoring" / "prometheus-rules.yml"
TOKEN = "live-metrics-token"
# Grafana's variables, as Grafana would expand them for a one-second scrape interval.
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$app": ".*"}
COMPARISON = re.compile(r"\s(>|<|>=|<=|==|!=)\s")


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["definition"].replace("label_values(", "group by (app) (").replace(", app)", ")"))
    expanded = []
    for query in queries:
        for name, value in GRAFANA_VARIABLES.items():
            query = query.replace(name, value)
        assert "$" not in query, f"unexpanded variable in {query!r}"
        expanded.append(query)
    return expanded


def rule_queries() -> list[str]:
    """Each alert's expression with its comparison made ``bool``: it returns data while not firing."""
    rules = subprocess.run(
        ["promtool", "check", "rules", "--lint=none", str(RULES)], capture_output=True, text=True, check=True
    )
    assert "SUCCESS: 4 rules found" in rules.stdout
    exprs = re.findall(r"^        expr: (?:>-\n((?:          .*\n)+)|(.*)\n)", RULES.read_text(), re.MULTILINE)
    queries = [(block or line).replace("\n", " ").strip() for block, line in exprs]
    assert len(queries) == 4
    return [COMPARISON.sub(lambda m: f" {m.group(1)} bool ", q) for q in queries]


def test_the_alert_rules_pass_promtool():
    run = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS: 4 rules found" in run.stdout


def test_the_dashboard_is_grafana_json_with_a_prometheus_query_per_panel():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 30
    graphs = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert graphs and all(p["targets"] and all(t["expr"].strip() for t in p["targets"]) for p in graphs)
    text = " ".join(t["expr"] for p in graphs for t in p["targets"])
    for needed in ("flush_lag_seconds", "redis_breaker_open", 'status=~"5..', "archive_lag_seconds"):
        assert needed in text


class Prometheus:
    def __init__(self, *, target: str, rules: Path):
        self.dir = Path(tempfile.mkdtemp(prefix="prometheus-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (self.dir / "token").write_text(TOKEN)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {
                    "job_name": "counterservice",
                    "metrics_path": "/metrics",
                    "authorization": {"type": "Bearer", "credentials_file": str(self.dir / "token")},
                    "static_configs": [{"targets": [target]}],
                }
            ],
        }
        (self.dir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log = open(self.dir / "log", "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                shutil.which("prometheus") or "prometheus",
                f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=self.log,
        )
        wait_until(lambda: requests.get(f"{self.url}/-/ready", timeout=1).ok, timeout=60, what="prometheus")

    def query(self, expr: str) -> list:
        reply = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5).json()
        assert reply["status"] == "success", (expr, reply)
        return reply["data"]["result"]

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def worker_pids(master_pid: int) -> set[int]:
    children = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split()
    return {int(pid) for pid in children}


def increments_counted_by(metrics_dir: Path, pid: int) -> float:
    """What one web worker's own file says it answered (the per-process view /metrics merges)."""
    files = [str(f) for f in metrics_dir.glob(f"counter_{pid}.db")]
    found = 0.0
    for metric in MultiProcessCollector.merge(files, accumulate=True):
        for s in metric.samples:
            if s.name == f"{P}_http_requests_total" and s.labels.get("endpoint") == "counter-increment":
                found += s.value
    return found


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_prometheus_scrapes_a_live_instance_and_every_query_has_data(builtins, make_key):
    default = App.objects.get(slug="default")
    boss = Counter.objects.create(app=default, name="boss_kills", public=True)
    Channel.objects.create(threshold=Threshold.objects.create(counter=boss, value=3, level="info"), kind="message")
    key = make_key(("write", "counter_manage", "data_view"))
    headers = {"Authorization": f"Bearer {key}"}
    metrics_dir = Path(tempfile.mkdtemp(prefix="metrics-live-"))
    env = {
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "METRICS_TOKEN": TOKEN,
        # Not loopback: the scrapes below must show the token.
        "METRICS_ALLOWED_NETWORKS": "192.0.2.0/24",
        "METRICS_COUNTERS": "default/matches_running,default/boss_kills",
    }
    web = Gunicorn(workers=2, env=env)
    worker = CeleryWorker(env=env)
    prometheus = None
    try:

        def scrape() -> str:
            reply = requests.get(f"{web.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
            assert reply.status_code == 200, reply.text
            return reply.text

        assert requests.get(f"{web.url}/metrics", timeout=5).status_code == 401
        pids = worker_pids(web.process.pid)
        assert len(pids) == 2

        # Fresh connections from several threads, until both workers have answered some.
        sent = 0
        lock = threading.Lock()

        def burst(count: int) -> None:
            nonlocal sent
            for _ in range(count):
                reply = requests.post(f"{web.url}/api/v1/counter/matches_running/increment", json={}, headers=headers)
                assert reply.status_code == 200
                with lock:
                    sent += 1

        for _ in range(20):
            threads = [threading.Thread(target=burst, args=(10,)) for _ in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if all(increments_counted_by(metrics_dir, pid) > 0 for pid in pids):
                break
        per_worker = {pid: increments_counted_by(metrics_dir, pid) for pid in pids}
        assert all(per_worker.values()), per_worker
        inc_ok = {"surface": "rest", "endpoint": "counter-increment", "method": "POST", "status": "200"}
        assert sum(per_worker.values()) == sent
        assert sample(scrape(), f"{P}_http_requests_total", **inc_ok) == sent

        # kill -9 one worker: its counts stay in the totals, its live gauge is dropped.
        victim = min(pids)
        subprocess.run(["kill", "-9", str(victim)], check=True)
        wait_until(lambda: len(worker_pids(web.process.pid) - {victim}) == 2, what="a replacement worker")
        wait_until(lambda: not (metrics_dir / f"gauge_livemax_{victim}.db").exists(), what="child_exit clean-up")
        assert sample(scrape(), f"{P}_http_requests_total", **inc_ok) == sent

        # The rest of the work the dashboard shows: reads, functions, a batch, errors, the
        # threshold's alert, flushes and an archive run by the Celery worker.
        for _ in range(3):
            assert requests.get(f"{web.url}/api/v1/counter/matches_running", headers=headers).ok
        assert requests.get(f"{web.url}/api/v1/counter/nope", headers=headers).status_code == 404
        batch = {"updates": [{"name": "boss_kills", "value": 1}] * 3}
        assert requests.post(f"{web.url}/api/v1/counters/batch", json=batch, headers=headers).ok
        body = {"appId": "default", "counterType": "app", "counterId": "matches_running", "increment": 1}
        assert (
            requests.post(f"{web.url}/api/v1/functions/increaseCounter", json=body, headers=headers).json()["code"] == 0
        )
        flushes = 3
        for _ in range(flushes):
            flush.delay()
        close_periods.delay()

        def worker_done() -> bool:
            text = scrape()
            return (
                total(text, f"{P}_celery_tasks_total", task="counters.flush") == flushes
                and total(text, f"{P}_archive_runs_total") == 1
                and sample(text, f"{P}_alert_deliveries_total", channel="message", outcome="sent") == 1
                and sample(text, f"{P}_flush_pending_deltas") == 0
            )

        wait_until(worker_done, timeout=60, interval=0.5, what="the worker's flushes, archive run and alert")
        text = scrape()
        assert sample(text, f"{P}_flush_deltas_sum") == sent + 1 + 3  # every operation, once
        assert sample(text, f"{P}_counter_value", app="default", counter="matches_running") == sent + 1
        assert sample(text, f"{P}_counter_value", app="default", counter="boss_kills") == 3

        prometheus = Prometheus(target=f"127.0.0.1:{web.port}", rules=RULES)
        wait_until(lambda: prometheus.query('up{job="counterservice"} == 1'), timeout=30, what="a successful scrape")
        # A second round of traffic once Prometheus watches, so that every rate has two samples.
        burst(5)
        queries = dashboard_queries() + rule_queries()
        empty: list[str] = []

        def all_have_data() -> bool:
            empty[:] = [q for q in queries if not prometheus.query(q)]
            return not empty

        try:
            wait_until(all_have_data, timeout=60, interval=1, what="data for every query")
        except AssertionError:
            raise AssertionError(f"queries without data: {empty}") from None

        def matches_running_in_prometheus() -> float:
            [series] = prometheus.query('max(counterservice_counter_value{counter="matches_running"})')
            return float(series["value"][1])

        wait_until(lambda: matches_running_in_prometheus() == sent + 1, timeout=30, what="the value in Prometheus")
        rules = requests.get(f"{prometheus.url}/api/v1/rules", timeout=5).json()["data"]["groups"]
        loaded = {r["name"]: r["health"] for g in rules for r in g["rules"]}
        assert loaded == {
            "CounterServiceFlushLagging": "ok",
            "CounterServiceRedisBreakerOpen": "ok",
            "CounterServiceHigh5xxRate": "ok",
            "CounterServiceArchiveLate": "ok",
        }
    finally:
        if prometheus is not None:
            prometheus.close()
        worker.close()
        web.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)

"""Scrape config, alert rules and the Grafana dashboard against a live scrape of the real daemon:
promtool check config/rules/metrics, promtool test rules, and every metric they name exists."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.conftest import Fake
from tests.packaging.conftest import ROOT, need_tool
from tests.support.daemon import DaemonProc

pytestmark = pytest.mark.e2e
PROM = ROOT / "packaging" / "prometheus"
PROMQL_FUNCS = {"sum", "rate", "increase", "max", "min", "by", "histogram_quantile", "absent",
                "deriv", "and", "or", "on", "le", "avg", "count", "without", "irate",
                "label_values", "humanize", "humanizePercentage"}


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    fake = Fake("ollama", "--fake-vectors", "hash", "--models", "all-minilm")
    d = DaemonProc({"cache": {"backend": "memory"}, "embedding": {
        "default_model": "all-minilm", "models": {"all-minilm": {
            "backend": "ollama", "dims": 384, "endpoints": [{"url": fake.url}]}}}},
        tmp_path_factory.mktemp("prom")).start()
    try:
        httpx.post(d.url + "/api/v1/embed", json={"texts": ["one", "two"]}, timeout=30)
        httpx.post(d.url + "/api/v1/embed", json={"text": ""}, timeout=30)  # a 400
        yield httpx.get(d.url + "/metrics", timeout=10).text
    finally:
        d.stop()
        fake.stop()


def exposed_families(text: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^# TYPE (\S+) ", text, re.M)}


def sample_names(text: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.M)}


def referenced(expr: str) -> set[str]:
    names = set(re.findall(r"\b(citadel_[a-z0-9_]+)", expr))
    return {n for n in names if n not in PROMQL_FUNCS}


def defined_in_source(name: str) -> bool:
    base = re.sub(r"_(total|bucket|count|sum)$", "", name)
    return any(f'"{base}"' in p.read_text() for p in (ROOT / "citadeld").rglob("*.py"))


def test_promtool_check_metrics_on_a_live_scrape(scrape: str) -> None:
    promtool = need_tool("promtool", "prometheus")
    r = subprocess.run([promtool, "check", "metrics"], input=scrape, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_check_and_test_rules() -> None:
    promtool = need_tool("promtool", "prometheus")
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        r = subprocess.run([promtool, *args], cwd=PROM, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr


def test_scrape_config_is_valid(tmp_path: Path) -> None:
    promtool = need_tool("promtool", "prometheus")
    cfg = yaml.safe_load((PROM / "scrape.yml").read_text())
    cfg["rule_files"] = [str(PROM / "alerts.yml")]  # the example's path points at /etc
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert cfg["scrape_configs"][0]["metrics_path"] == "/metrics"


def test_alerts_cover_what_operators_need() -> None:
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"][0]["rules"]
    alerts = {r["alert"] for r in rules}
    assert {"CitadelDaemonDown", "CitadelBreakerOpen", "CitadelQueueSaturated",
            "CitadelOutboxGrowing", "CitadelHighErrorRate", "CitadelCacheDown"} <= alerts
    runbook = (ROOT / "docs" / "operations.md").read_text()
    sections = {h.lower() for h in re.findall(r"^### (\S+)$", runbook, re.M)}
    for rule in rules:  # every alert points at a runbook section that exists
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        assert anchor in sections, (rule["alert"], anchor)
    assert {a.lower() for a in alerts} - sections == {"citadelrequestsrejected"}


def test_rules_and_dashboard_name_metrics_that_exist(scrape: str) -> None:
    live = sample_names(scrape) | exposed_families(scrape)
    exprs = [r["expr"] for r in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"][0][
        "rules"]]
    dash = json.loads((PROM / "grafana-dashboard.json").read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    missing = set()
    for expr in exprs:
        for name in referenced(expr):
            if name not in live and not defined_in_source(name):
                missing.add(name)
    assert not missing, f"metrics neither scraped nor defined in citadeld/: {sorted(missing)}"
    assert len(dash["panels"]) >= 10 and dash["uid"] == "citadeld-overview"

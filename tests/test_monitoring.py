"""The Grafana dashboard and the Prometheus alerting rules shipped in the package: every
metric they name is one pmemblk exports, promtool accepts the rules and its unit test of them
passes (alerts that fire, and ones that must not)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pmemblk import layout
from pmemblk.address import parse_address
from pmemblk.plugin_instance import PluginState
from pmemblk.pmem import PmemRegion
from pmemblk.protocol import CLIENT_NONCE_SIZE, MAC_SIZE, Auth, Hello
from pmemblk.session import Admission, Greeting, ServeConfig
from pmemblk.target import Export

MONITORING = resources.files("pmemblk").joinpath("monitoring")
RULES = "pmemblk-alerts.yml"
RULES_TEST = "pmemblk-alerts.test.yml"
DASHBOARD = "pmemblk-dashboard.json"
METRIC = re.compile(r"\bpmemblk_[a-z0-9_]+\b")
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian package prometheus; scripts/setup installs it)")


Samples = dict[str, list[tuple[dict[str, str], float]]]


def samples(text: bytes) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text.decode()):  # type: ignore[no-untyped-call]
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def admit(export: Export, readonly: bool) -> None:
    hello = Hello(readonly=readonly, nonce=os.urandom(CLIENT_NONCE_SIZE), client_id=os.urandom(16))
    greeting = export.greet(hello.encode())
    assert isinstance(greeting, Greeting)
    assert isinstance(export.admit(greeting, Auth(bytes(MAC_SIZE)).encode()), Admission)


class TargetView(NamedTuple):
    samples: Samples
    #: What each flush method guarantees on this target (1: persistent).
    guarantees: dict[str, int]


@pytest.fixture
def target(tmp_path: Path) -> TargetView:
    """A target's metrics with one read-write and one read-only client connected (a file
    region: apm is visibility only there)."""
    path = str(tmp_path / "region.img")
    with PmemRegion.create(path, 4 << 20) as r:
        layout.format_region(r, 4096)
    export = Export(ServeConfig(path=path, listen=parse_address("unix:/nonexistent/s", "--listen"),
                                transports=("tcp",), shared=False))
    try:
        export.begin()
        admit(export, readonly=False)
        admit(export, readonly=True)
        return TargetView(samples(export.metrics()),
                          {g.method: int(g.persistent) for g in export.guarantees})
    finally:
        export.close()


def exported(target: TargetView) -> set[str]:
    return set(target.samples) | set(samples(PluginState().metrics()))


def named_in_rules() -> set[str]:
    text = MONITORING.joinpath(RULES).read_text()
    exprs = re.findall(r"expr: (?:>-\n)?((?:.*\n)*?)(?=\s+(?:for|labels):)", text)
    assert len(exprs) == text.count("- alert:") > 0
    return {m for e in exprs for m in METRIC.findall(e)}


def named_in_dashboard() -> set[str]:
    dash = json.loads(MONITORING.joinpath(DASHBOARD).read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    assert exprs
    return {m for e in exprs for m in METRIC.findall(e)}


def test_rules_and_dashboard_name_only_exported_metrics(target: TargetView) -> None:
    have = exported(target)
    for where, names in (("rules", named_in_rules()), ("dashboard", named_in_dashboard())):
        assert names, where
        assert names <= have, f"{where} name metrics pmemblk does not export: {names - have}"


def test_the_rules_cover_what_an_operator_must_hear() -> None:
    names = named_in_rules()
    for metric in ("pmemblk_client_reconnects_total", "pmemblk_client_errors_total",
                   "pmemblk_client_request_seconds_bucket", "pmemblk_client_persistent",
                   "pmemblk_target_flush_persistent", "pmemblk_target_writers"):
        assert metric in names, metric


def test_target_exports_writers_and_persistence_per_method(target: TargetView) -> None:
    assert [v for _, v in target.samples["pmemblk_target_clients"]] == [2]
    assert [v for _, v in target.samples["pmemblk_target_writers"]] == [1]
    methods = {labels["method"]: v
               for labels, v in target.samples["pmemblk_target_flush_persistent"]}
    assert methods == target.guarantees and methods["apm"] == 0


def test_dashboard_is_grafana_json() -> None:
    dash = json.loads(MONITORING.joinpath(DASHBOARD).read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "device", "region"}
    for p in dash["panels"]:
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}" and t["refId"]


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    with resources.as_file(MONITORING) as folder:
        res = subprocess.run(["promtool", "check", "rules", RULES], cwd=folder,
                             capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {named_rule_count()} rules found" in res.stdout


def named_rule_count() -> int:
    return MONITORING.joinpath(RULES).read_text().count("- alert:")


@needs_promtool
def test_promtool_unit_tests_the_alerts() -> None:
    tests = MONITORING.joinpath(RULES_TEST).read_text()
    assert len(set(re.findall(r"alertname: (\w+)", tests))) >= 3
    with resources.as_file(MONITORING) as folder:
        res = subprocess.run(["promtool", "test", "rules", RULES_TEST], cwd=folder,
                             capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr

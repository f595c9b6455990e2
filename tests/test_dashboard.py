"""The lithos page and metrics on a one-node Ray with two simulated H100s, in a real headless Chromium.

One Ray cluster for the whole module; every actor uses num_cpus=0. The browser test needs Debian's
chromium (/usr/bin/chromium) and the `playwright` Python package; it skips naming what is missing.
Set LITHOS_DASHBOARD_SCREENSHOT=docs/dashboard.png to refresh the screenshot in the docs.
"""
import json
import os
import socket
import time
import urllib.request
from pathlib import Path

import pytest
import ray
from test_cluster import wait_for
from test_serve import start_simulated_ray

import lithos_ray.dashboard as dashboard
from lithos_ray.errors import LithosError, LithosRequestError
from lithos_ray.grafana import OUTPUT_FILE_NAME, provision_grafana_dashboard
from lithos_ray.node import stop_agents
from lithos_ray.status import ClientReport, ClusterStatus, GpuReport, NodeReport

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
METRIC_NAMES = ["ray_lithos_gpu_tpcs_total", "ray_lithos_gpu_tpcs_granted", "ray_lithos_client_granted_tpcs"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    metrics_port = start_simulated_ray("H100:2", tmp_path_factory.mktemp("lithos-run"))
    url = dashboard.start_dashboard(port=0)
    yield {"url": url, "metrics_port": metrics_port}
    dashboard.stop_dashboard()
    stop_agents()
    ray.shutdown()


class ServiceBody:
    """A latency-critical client that reports its latencies like a lithos Serve replica does."""

    def __init__(self, name: str, slo_ms: float):
        import lithos_ray
        from lithos_ray.metrics import ClientLatencyRecorder
        grant = lithos_ray.current_grant()
        self.recorder = ClientLatencyRecorder(name, slo_ms, grant.grant_id, grant.gpu_uuid)

    def serve(self, latencies_ms: list[float]) -> dict:
        now = time.monotonic()
        for latency_ms in latencies_ms:
            self.recorder.observe(now - latency_ms / 1000, now)
        return self.recorder.publish().to_dict()


class BertService(ServiceBody):
    pass


class ResnetService(ServiceBody):
    pass


class TrainingJob:
    pass


Service = ray.remote(num_cpus=0)(ServiceBody)
LC_ENV = {"env_vars": {"LITHOS_PRIORITY": "latency_critical", "LITHOS_SLO_MS": "10"}}


def state(url):
    return json.load(urllib.request.urlopen(url + "api/state", timeout=10))


def client_names(url):
    return sorted(c["name"] for n in state(url)["nodes"] for g in n["gpus"] for c in g["clients"])


# -- pure parts -----------------------------------------------------------------------------------
def test_page_state_maps_every_tpc_to_its_owner():
    from lithos_ray.dashboard.server import page_state

    client = ClientReport(grant_id="g1", pid=7, name="svc", ray_job_id="", ray_task_id="", ray_actor_id="a",
                          priority="latency_critical", slo_ms=10.0, granted_tpcs=3, tpc_ids=[4, 5, 6],
                          granted_at_unix_s=1.0)
    gpu = GpuReport(index=0, uuid="SIM-H100-x-0", model="H100", simulated=True, sms=132, total_tpcs=66,
                    granted_tpcs=3, free_tpcs=63, agent_address="", native_status="sim", clients=[client])
    status = ClusterStatus(nodes=[NodeReport(node_id="n1", node_ip="10.0.0.1", gpus=[gpu])])
    out = page_state(status, {"g1": {"slo_attainment": 0.5}}, 123.0)
    (g,) = out["nodes"][0]["gpus"]
    assert [i for i, owner in enumerate(g["tpc_owner"]) if owner == "g1"] == [4, 5, 6]
    assert g["tpc_owner"].count(None) == 63 and g["tpc_lent_to"] == [None] * 66
    assert g["telemetry"] is None and g["busy_tpcs"] is None and g["lent_tpcs"] is None
    assert g["clients"][0]["latency"] == {"slo_attainment": 0.5} and g["clients"][0]["slo_ms"] == 10.0


def test_grafana_dashboard_goes_where_rays_go(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR", raising=False)
    monkeypatch.delenv("RAY_METRICS_OUTPUT_ROOT", raising=False)
    written = provision_grafana_dashboard(str(tmp_path))
    assert written == tmp_path / "metrics" / "grafana" / "dashboards" / OUTPUT_FILE_NAME
    board = json.loads(written.read_text())
    queries = " ".join(t["expr"] for p in board["panels"] for t in p["targets"])
    for name in METRIC_NAMES + ["ray_lithos_client_latency_ms_bucket", "ray_lithos_client_slo_attainment",
                                "ray_lithos_gpu_power_w", "ray_serve_deployment_processing_latency_ms_bucket"]:
        assert name in queries, name
    monkeypatch.setenv("RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR", str(tmp_path / "custom"))
    assert provision_grafana_dashboard(str(tmp_path)) == tmp_path / "custom" / OUTPUT_FILE_NAME
    with pytest.raises(FileNotFoundError, match="session directory"):
        provision_grafana_dashboard(str(tmp_path / "missing"))


# -- on the cluster -------------------------------------------------------------------------------
def test_dashboard_url_state_and_bad_port(cluster):
    assert dashboard.dashboard_url() == cluster["url"]
    assert dashboard.start_dashboard() == cluster["url"]         # already running: same page
    gpus = [g for n in state(cluster["url"])["nodes"] for g in n["gpus"]]
    assert [(g["model"], g["total_tpcs"], g["simulated"], len(g["tpc_owner"])) for g in gpus] == [("H100", 66, True, 66)] * 2
    board = state(cluster["url"])["grafana_dashboard"]
    assert board.endswith("metrics/grafana/dashboards/" + OUTPUT_FILE_NAME) and Path(board).exists()
    with pytest.raises(LithosRequestError, match="0..65535"):
        dashboard.start_dashboard(port=70000)


def test_metrics_reach_prometheus(cluster):
    service = Service.options(resources={"lithos_tpc": 6}, runtime_env=LC_ENV).remote("metrics-svc", 10.0)
    summary = ray.get(service.serve.remote([2.0, 4.0, 30.0, 5.0]))
    assert summary["requests"] == 4 and summary["slo_attainment"] == 0.75 and summary["p99_ms"] == pytest.approx(30.0)

    def exported():
        text = urllib.request.urlopen(f"http://127.0.0.1:{cluster['metrics_port']}/metrics").read().decode()
        return [line for line in text.splitlines() if line.startswith("ray_lithos_")]
    def with_the_client():
        lines = exported()
        return lines if any(l.startswith("ray_lithos_client_granted_tpcs{") and 'Client="ServiceBody"' in l
                            and l.endswith(" 6.0") for l in lines) else None
    lines = wait_for(with_the_client, what="lithos gauges in Prometheus")
    for name in METRIC_NAMES:
        assert any(l.startswith(name + "{") for l in lines), name
    granted = [l for l in lines if l.startswith("ray_lithos_gpu_tpcs_granted{")]
    assert sorted(float(l.rsplit(" ", 1)[1]) for l in granted) == [0.0, 6.0]
    assert not any(l.startswith(("ray_lithos_gpu_tpcs_busy", "ray_lithos_gpu_tpcs_lent")) for l in lines)  # not known: simulated
    assert not any(l.startswith(("ray_lithos_gpu_power_w", "ray_lithos_gpu_clock_mhz")) for l in lines)  # simulated
    assert any(l.startswith("ray_lithos_client_slo_attainment{") and l.endswith(" 0.75") for l in lines)
    ray.kill(service)
    wait_for(lambda: "metrics-svc" not in client_names(cluster["url"]), what="the client to leave the page")


def _browser_missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing: apt-get install -y chromium"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is missing: pip install playwright"
    return None


def test_page_in_chromium_shows_gpus_and_updates_when_a_client_arrives(cluster):
    missing = _browser_missing()
    if missing:
        pytest.skip(missing)
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(cluster["url"])
        gpus = page.locator("[data-testid=gpu]")
        expect(gpus).to_have_count(2)
        expect(gpus.first).to_contain_text("SIMULATED")
        expect(gpus.first.locator(".tpc")).to_have_count(66)
        expect(page.locator("#summary")).to_contain_text("0 client(s)")

        bert = ray.remote(num_cpus=0, resources={"lithos_tpc": 24}, runtime_env=LC_ENV)(BertService).remote(
            "bert-base", 10.0)
        ray.get(bert.serve.remote([3.8] * 97 + [11.0] * 3))
        row = page.locator("tr", has_text="BertService")            # arrives without a reload
        expect(row).to_be_visible(timeout=15_000)
        expect(row).to_contain_text("latency-critical")
        expect(row).to_contain_text("10 ms")
        expect(row).to_contain_text("97.0%", timeout=15_000)       # its report reached the page
        grant_id = row.get_attribute("data-grant-id")
        expect(page.locator(f".tpc[data-owner='{grant_id}']")).to_have_count(24)

        trainer = ray.remote(num_cpus=0, resources={"lithos_tpc": 40})(TrainingJob).remote()
        resnet = ray.remote(num_cpus=0, resources={"lithos_tpc": 16}, runtime_env=LC_ENV)(ResnetService).remote(
            "resnet50", 10.0)
        ray.get(resnet.serve.remote([6.0] * 80 + [12.0] * 20))
        expect(page.locator("#summary")).to_contain_text("3 client(s)", timeout=15_000)
        expect(page.locator("#summary")).to_contain_text("80 of 132 TPCs granted")
        expect(page.locator("tr", has_text="ResnetService")).to_contain_text("80.0%", timeout=15_000)
        screenshot = os.environ.get("LITHOS_DASHBOARD_SCREENSHOT")
        if screenshot:
            page.screenshot(path=screenshot, full_page=True)
        browser.close()
    for actor in (bert, trainer, resnet):
        ray.kill(actor)
    wait_for(lambda: client_names(cluster["url"]) == [], what="both clients to leave the page")


def test_stop_and_restart_on_another_port(cluster):
    assert dashboard.stop_dashboard() is True
    assert dashboard.dashboard_url() is None and dashboard.stop_dashboard() is False
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(LithosError, match=f"cannot listen on 127.0.0.1:{busy.getsockname()[1]}"):
            dashboard.start_dashboard(port=busy.getsockname()[1])
    assert dashboard.dashboard_url() is None
    url = dashboard.start_dashboard(port=0)
    assert url.startswith("http://127.0.0.1:") and state(url)["nodes"]
    cluster["url"] = url

"""The dashboard in a real headless Chromium from file:// (offline), `orch dashboard --serve` and `orch ui`
(the real MLflow server) on 127.0.0.1, each stopped with Ctrl-C."""

import base64
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts services or trains beyond a few steps (docs/development.md)

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
HEADLESS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=15000",
]


def chromium(tmp_path: Path, *args: str) -> str:
    assert Path(CHROMIUM).exists(), "Chromium is needed: `make test` installs Debian's chromium package"
    command = [CHROMIUM, *HEADLESS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


def rendered_figures(dom: str) -> list[str]:
    """The DOM of each Plotly figure, as rendered (after plotly.js ran)."""
    starts = [m.start() for m in re.finditer(r'<div[^>]*class="[^"]*plotly-graph-div', dom)]
    return [dom[a:b] for a, b in zip(starts, starts[1:] + [len(dom)])]


def has_data(figure: str) -> bool:
    """A drawn line, bar or marker path, or table cell text: something plotted, not an empty frame."""
    marks = r'class="js-line"[^>]*d="M|class="point"[^>]*d="M|class="point"><path d="M|class="cell-text'
    return bool(re.search(marks, figure))


def test_dashboard_renders_every_figure_with_data_in_headless_chromium(tiny_study, tmp_path):
    _, study_dir, _ = tiny_study
    url = (study_dir / "dashboard.html").as_uri()
    figures = rendered_figures(chromium(tmp_path, "--dump-dom", url))
    assert len(figures) >= 3
    assert all('class="main-svg"' in f for f in figures), "a figure was not drawn"
    empty = [i for i, f in enumerate(figures) if not has_data(f)]
    assert not empty, f"figures without data: {empty}"
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    chromium(tmp_path, "--window-size=1300,3000", f"--screenshot={shot}", url)
    assert shot.stat().st_size > 50_000


def ignore_interrupts() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def start(args: list[str], sigint_ignored: bool = False) -> tuple[subprocess.Popen, str, str]:
    """Start an orch server command and return it with the server's URL and the line that printed it;
    `sigint_ignored`: started as a script's background job is, with SIGINT ignored."""
    process = subprocess.Popen(
        [sys.executable, "-m", "orch.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
        preexec_fn=ignore_interrupts if sigint_ignored else None,
    )
    for line in process.stdout:
        if match := re.search(r"(http://127\.0\.0\.1:\d+)", line):
            return process, match.group(1), line
    raise AssertionError(f"no URL printed; exit code {process.wait()}")


def stop_with_ctrl_c(process: subprocess.Popen, url: str) -> None:
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["ctrl-c", "kill -INT to a background job"])
def test_dashboard_serve(tiny_study, sigint_ignored):
    workdir, _, _ = tiny_study
    serve = ["dashboard", "tiny", "--workdir", str(workdir), "--serve", "--interval", "5"]
    process, url, _ = start(serve, sigint_ignored)
    try:
        page = urllib.request.urlopen(url, timeout=30).read().decode()
        assert "Plotly.newPlot(" in page and 'http-equiv="refresh" content="5"' in page
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(url + "/etc/passwd", timeout=5)
    finally:
        stop_with_ctrl_c(process, url)


def api(url: str, path: str, auth: str | None = None, body: dict | None = None) -> dict:
    """An MLflow REST call (GET, or POST with `body`) with an Authorization header when given."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": auth} if auth else {})
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{url}{path}", data, headers, method="POST" if body is not None else "GET")
    return json.load(urllib.request.urlopen(request, timeout=30))


def login(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_mlflow_ui_lists_the_study_runs_over_rest_to_its_users_only(tiny_study):
    """`orch ui` serves MLflow's basic-auth app: without the study's credentials (0600, in a 0700 folder) every
    API call is refused (401); the owner reads the runs; the read-only user reads them and may not write (403)."""
    workdir, study_dir, _ = tiny_study
    process, url, line = start(["ui", "tiny", "--workdir", str(workdir)])
    try:
        credentials = study_dir / "ui" / "credentials.json"
        passwords = json.loads(credentials.read_text())
        assert credentials.stat().st_mode & 0o777 == 0o600 and (study_dir / "ui").stat().st_mode & 0o777 == 0o700
        assert f"log in as 'orch', password {passwords['orch']}" in process.stdout.readline()  # printed once
        with pytest.raises(urllib.error.HTTPError) as refused:
            api(url, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=tiny")
        assert refused.value.code == 401
        owner, viewer = login("orch", passwords["orch"]), login("viewer", passwords["viewer"])
        experiment = api(url, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=tiny", owner)["experiment"]
        search = {"experiment_ids": [experiment["experiment_id"]], "max_results": 100}
        runs = api(url, "/api/2.0/mlflow/runs/search", owner, search)["runs"]
        # the printed link opens this experiment's runs in the "Model training" view, not the GenAI overview
        assert f"{url}/#/experiments/{experiment['experiment_id']}/runs?workflowType=machine_learning" in line
        roles = sorted(t["value"] for r in runs for t in r["data"]["tags"] if t["key"] == "orch.role")
        assert roles == ["study", "trial", "trial", "trial", "trial"]
        assert len(api(url, "/api/2.0/mlflow/runs/search", viewer, search)["runs"]) == len(runs)
        with pytest.raises(urllib.error.HTTPError) as forbidden:
            api(url, "/api/2.0/mlflow/runs/create", viewer, {"experiment_id": experiment["experiment_id"]})
        assert forbidden.value.code == 403
    finally:
        stop_with_ctrl_c(process, url)


def test_mlflow_ui_stops_its_server_on_sigterm(tiny_study):
    """Also: --read-only prints the login of the user who may only read, for sharing."""
    workdir, study_dir, _ = tiny_study
    process, url, _ = start(["ui", "tiny", "--workdir", str(workdir), "--read-only"])
    assert urllib.request.urlopen(f"{url}/health", timeout=30).status == 200
    viewer = json.loads((study_dir / "ui" / "credentials.json").read_text())["viewer"]
    assert f"log in as 'viewer', password {viewer} (may read, not change, the study)" in process.stdout.readline()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    with pytest.raises(urllib.error.URLError):  # the server went down with orch, not orphaned
        urllib.request.urlopen(f"{url}/health", timeout=2)

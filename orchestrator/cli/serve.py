"""Local servers, bound to 127.0.0.1: the live dashboard and the MLflow UI over a study's store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from orch.cli.ui_auth import OWNER, VIEWER, UiAuth, ensure_viewer, ui_auth
from orch.trial.state import TrialState
from orch.trial.status import FINISHED_STATES

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def study_active(study_dir: Path) -> bool:
    """Whether any trial of the study is still pending or running (then the dashboard keeps refreshing)."""
    return any(TrialState.load(d).status not in FINISHED_STATES for d in (study_dir / "trials").iterdir())


def serve_dashboard(tracking_uri: str, study_dir: Path, port: int | None, interval: int) -> int:
    """Serve the study's dashboard at http://127.0.0.1:PORT/, rebuilt every `interval` seconds while trials run
    (the page reloads itself on the same period); also keeps <study>/dashboard.html up to date."""
    from orch.dashboards.report import build_dashboard

    page = {"html": b""}
    reload = f'<meta charset="utf-8"><meta http-equiv="refresh" content="{interval}">'

    def rebuild() -> None:
        html = build_dashboard(tracking_uri, study_dir.name, study_dir / "dashboard.html").read_text()
        page["html"] = html.replace('<meta charset="utf-8">', reload, 1).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 — http.server's name
            if self.path not in ("/", "/index.html"):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page["html"])))
            self.end_headers()
            self.wfile.write(page["html"])

        def log_message(self, *args):  # quiet: one line per request is noise here
            pass

    rebuild()
    server = ThreadingHTTPServer((HOST, port or free_port()), Handler)
    stop = threading.Event()

    def refresher() -> None:
        while not stop.wait(interval):
            if study_active(study_dir):
                rebuild()

    threading.Thread(target=refresher, daemon=True).start()
    print(f"dashboard of {study_dir.name!r}: http://{HOST}:{server.server_port}/  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        server.server_close()
    return 0


def wait_for_health(url: str, process: subprocess.Popen, timeout: float = 90) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def experiment_url(url: str, tracking_uri: str, experiment: str) -> str:
    """The experiment's runs in the UI's "Model training" view: MLflow 3's UI opens its GenAI view unless the
    URL names the workflow (it ignores the experiment's kind tag when choosing)."""
    from mlflow.tracking import MlflowClient

    found = MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    return f"{url}/#/experiments/{found.experiment_id}/runs?workflowType=machine_learning" if found else url


def login_line(auth: UiAuth, read_only: bool) -> str:
    """How to log in: the read-only user's password (to share), or the owner's, printed when just generated."""
    file = auth.folder / "credentials.json"
    if read_only:
        return f"log in as {VIEWER!r}, password {auth.passwords[VIEWER]} (may read, not change, the study)"
    if auth.created:
        return f"log in as {OWNER!r}, password {auth.passwords[OWNER]} (generated now; kept in {file}, mode 0600)"
    return f"log in as {OWNER!r}, password in {file}; `orch ui --read-only` gives a user who may only read"


def serve_mlflow_ui(tracking_uri: str, study_dir: Path, port: int | None, read_only: bool = False) -> int:
    """The MLflow UI over a study's local store on 127.0.0.1, behind the study's credentials (ui_auth.py), its URL
    opening the study's experiment; for a remote tracking server, say where it is. `read_only` prints the
    credentials of the user who may only read. The server's own output (a line per request) goes to
    <study>/mlflow-ui.log, not the terminal."""
    if tracking_uri.startswith(("http://", "https://", "databricks")):
        print(f"this study tracks to a remote server: open {tracking_uri} in a browser")
        return 0
    auth, log_path = ui_auth(study_dir), study_dir / "mlflow-ui.log"
    port = port or free_port()
    url = f"http://{HOST}:{port}"
    env = (
        os.environ
        | auth.environment
        | {
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # measured: /health in ~5 s, not 9–15 s
            "PYTHONWARNINGS": "ignore::DeprecationWarning",  # the server's dependencies' warnings, not the user's
        }
    )
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        tracking_uri,
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
        "--app-name",
        "basic-auth",
        "--artifacts-destination",  # uploads through the server land in the study, never in the current folder
        str((study_dir / "artifacts").resolve()),
    ]
    log = open(log_path, "ab")  # noqa: SIM115 — the server writes it until it stops
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM like Ctrl-C: never orphan the server
    try:
        if not wait_for_health(url, process):
            print(f"error: the MLflow UI did not start (exit code {process.poll()}); see {log_path}", file=sys.stderr)
            return 1
        ensure_viewer(url, auth)
        link = experiment_url(url, tracking_uri, study_dir.name)
        print(f"MLflow UI: {link}  (Ctrl-C to stop; the server's log: {log_path})", flush=True)
        print(login_line(auth, read_only), flush=True)
        process.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        log.close()

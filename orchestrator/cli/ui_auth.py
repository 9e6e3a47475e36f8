"""Authentication of `orch ui`: MLflow's basic-auth app with credentials orch generates once per study.

<study>/ui/ (0700) holds credentials.json (0600: the owner `orch`, who may change the study, and a `viewer` who
may only read it), auth.ini (the auth app's configuration, 0600), auth.db (its users) and the server's secret
key. Another local user reaches the port but not these files, so gets 401 from every page and API."""

from __future__ import annotations

import json
import os
import secrets
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import dataclass
from pathlib import Path

from orch.trial.state import atomic_write_bytes, read_json

OWNER, VIEWER = "orch", "viewer"


@dataclass(frozen=True)
class UiAuth:
    folder: Path
    passwords: dict[str, str]
    """user → password."""
    created: bool
    """Whether the credentials were made now (they are then printed once)."""

    @property
    def environment(self) -> dict[str, str]:
        """What the MLflow server needs to run the basic-auth app with these users."""
        secret = (self.folder / "secret_key").read_text().strip()
        return {"MLFLOW_AUTH_CONFIG_PATH": str(self.folder / "auth.ini"), "MLFLOW_FLASK_SERVER_SECRET_KEY": secret}

    def header(self, user: str) -> str:
        """The HTTP Authorization header of `user`."""
        return "Basic " + b64encode(f"{user}:{self.passwords[user]}".encode()).decode()


def ui_auth(study_dir: Path) -> UiAuth:
    """The study's UI credentials, generated (random, 0600) on first use and the same ever after."""
    folder = study_dir / "ui"
    folder.mkdir(mode=0o700, exist_ok=True)
    credentials = folder / "credentials.json"
    if (passwords := read_json(credentials)).keys() >= {OWNER, VIEWER}:
        return UiAuth(folder, passwords, created=False)
    passwords = {OWNER: secrets.token_urlsafe(18), VIEWER: secrets.token_urlsafe(18)}
    config = (
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{folder.resolve() / 'auth.db'}\n"
        f"admin_username = {OWNER}\n"
        f"admin_password = {passwords[OWNER]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    (folder / "auth.db").unlink(missing_ok=True)  # users of lost credentials: the auth app makes them again
    for name, text in (("auth.ini", config), ("secret_key", secrets.token_hex(32)), ("credentials.json", None)):
        body = json.dumps(passwords, indent=2) + "\n" if text is None else text
        atomic_write_bytes(folder / name, body.encode())
        os.chmod(folder / name, 0o600)
    return UiAuth(folder, passwords, created=True)


def ensure_viewer(url: str, auth: UiAuth) -> None:
    """Create the read-only user through the running server's API (the auth app makes only its admin)."""
    body = json.dumps({"username": VIEWER, "password": auth.passwords[VIEWER]}).encode()
    headers = {"Content-Type": "application/json", "Authorization": auth.header(OWNER)}
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/users/create", body, headers, method="POST")
    try:
        urllib.request.urlopen(request, timeout=30).close()
    except urllib.error.HTTPError as e:
        if e.code != 400:  # 400: it exists already
            raise

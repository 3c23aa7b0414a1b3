"""CURVE security for links that cross a LAN, and ``llvc keys``.

A voice crosses the network to the inference box, so every ``tcp://`` link can be encrypted and
authenticated with ZeroMQ CURVE (``[security] curve = true`` in the pipeline config):

* the side that **binds** is the CURVE server: it holds the server key pair and admits only the
  clients whose public keys are in ``KEYS_DIR/authorized/`` (a ZAP authenticator thread runs
  those checks); an unknown or plaintext client never completes the handshake, so nothing it
  sends reaches the application;
* the side that **connects** is a CURVE client: it holds a client key pair and the server's
  public key.

``llvc keys init DIR`` makes one server pair and one client pair and authorizes the client.
Copy the folder to every host of the pipeline (secret keys are 0600, the folder 0700). Give a
dashboard, or each client of a shared inference server, its own identity with ``llvc keys
add-client DIR NAME`` and ``[security] client_key = "NAME"`` on that host: inference binds a
session to the key that opened it (:mod:`services.sessions`). Links over ``ipc://`` and
``inproc://`` never leave the host and stay plaintext.

Layout of ``DIR``::

    server.key  server.key_secret      the binding side's pair
    client.key  client.key_secret      the connecting side's pair
    authorized/client.key              public keys the servers admit (one file per client)
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

AUTHORIZED = "authorized"


class SecurityError(RuntimeError):
    """Keys are missing or unreadable (one line naming the file and the fix)."""


@dataclass(frozen=True)
class CurveKeys:
    """Key material loaded from a keys folder (z85-encoded bytes)."""

    folder: Path
    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @property
    def authorized_dir(self) -> Path:
        """Folder of client public keys that servers admit."""
        return self.folder / AUTHORIZED


def _load_pair(folder: Path, name: str) -> tuple[bytes, bytes]:
    secret_file = folder / f"{name}.key_secret"
    if not secret_file.is_file():
        raise SecurityError(f"{secret_file}: missing (create keys with `llvc keys init {folder}`)")
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as exc:
        raise SecurityError(f"{secret_file}: not a readable CURVE key file ({exc})") from None
    if not secret:
        raise SecurityError(f"{secret_file}: holds no secret key")
    return public, secret


def load_keys(folder: str | Path, client: str = "client") -> CurveKeys:
    """Load the server pair and the client pair ``client`` (``NAME.key_secret``; a client made by
    ``llvc keys add-client DIR NAME``) from ``folder`` (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SecurityError(f"{folder}: keys folder not found (create it with `llvc keys init {folder}`)")
    server_public, server_secret = _load_pair(folder, "server")
    client_public, client_secret = _load_pair(folder, client)
    if not (folder / AUTHORIZED).is_dir():
        raise SecurityError(f"{folder / AUTHORIZED}: missing folder of authorized client keys")
    return CurveKeys(folder, server_public, server_secret, client_public, client_secret)


def make_server(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Turn ``sock`` (not yet bound) into a CURVE server."""
    sock.curve_secretkey = keys.server_secret
    sock.curve_publickey = keys.server_public
    sock.curve_server = True


def make_client(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Turn ``sock`` (not yet connected) into a CURVE client of the pipeline's server key."""
    sock.curve_secretkey = keys.client_secret
    sock.curve_publickey = keys.client_public
    sock.curve_serverkey = keys.server_public


def start_authenticator(context: zmq.Context, keys: CurveKeys) -> ThreadAuthenticator:
    """Start the ZAP handler that admits only ``authorized/`` client keys on ``context``."""
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.authorized_dir))
    return auth


def authorized_names(keys: CurveKeys) -> dict[str, str]:
    """``{z85 public key: name}`` of every client in ``authorized/`` (``NAME.key``): how a
    CURVE peer's identity (the ZAP User-Id is its z85 key) is named in messages and checked
    against ``security.controllers``. Unreadable files are left out."""
    out = {}
    for path in sorted(keys.authorized_dir.glob("*.key")):
        try:
            public, _ = zmq.auth.load_certificate(path)
        except (OSError, ValueError):
            continue
        out[public.decode("ascii")] = path.stem
    return out


# --------------------------------------------------------------------------- llvc keys
def _secure_pair(folder: Path, name: str) -> None:
    public, secret = zmq.auth.create_certificates(folder, name)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)


def init_keys(folder: str | Path, force: bool = False) -> Path:
    """Create ``folder`` with a server pair, a client pair and the client authorized."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not force:
        raise SecurityError(f"{folder}: already exists and is not empty (use --force to replace its keys)")
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    for name in ("server", "client"):
        _secure_pair(folder, name)
    (folder / AUTHORIZED).mkdir(exist_ok=True)
    shutil.copyfile(folder / "client.key", folder / AUTHORIZED / "client.key")
    return folder


def add_client(folder: str | Path, name: str) -> Path:
    """Create another client pair ``NAME.key[_secret]`` and authorize it; returns the secret file."""
    folder = Path(folder)
    load_keys(folder)  # the folder must be a complete keys folder already
    if not name or "/" in name or name.startswith(".") or name in ("server", "client"):
        raise SecurityError(f"{name!r}: not a usable client name")
    if (folder / f"{name}.key_secret").exists():
        raise SecurityError(f"{folder / (name + '.key_secret')}: already exists")
    _secure_pair(folder, name)
    shutil.copyfile(folder / f"{name}.key", folder / AUTHORIZED / f"{name}.key")
    return folder / f"{name}.key_secret"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``llvc keys``'s arguments on ``p``."""
    p.add_argument("action", choices=("init", "add-client"),
                   help="init: new server and client pairs; add-client: one more authorized client")
    p.add_argument("dir", help="keys folder (the pipeline config's security.keys_dir)")
    p.add_argument("name", nargs="?", help="client name for add-client")
    p.add_argument("--force", action="store_true", help="init: replace keys in a non-empty folder")


def run(args: argparse.Namespace) -> int:
    """Execute ``llvc keys``."""
    try:
        if args.action == "init":
            folder = init_keys(args.dir, force=args.force)
            print(f"created CURVE keys in {folder}: server and client pairs, client authorized; "
                  f"copy the folder to every host and set [security] curve = true")
        else:
            if not args.name:
                raise SecurityError("add-client needs a NAME")
            secret = add_client(args.dir, args.name)
            print(f"created and authorized client {args.name}: {secret}")
    except (SecurityError, OSError) as exc:
        print(f"llvc keys: error: {exc}", file=sys.stderr)
        return 1
    return 0

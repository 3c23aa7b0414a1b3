"""``llvc download``: fetch upstream's released LLVC checkpoint and make it ready to use.

Upstream (KoeAI/LLVC) publishes its weights in the Hugging Face hub repository ``KoeAI/llvc``;
its ``download_models.py`` mirrors that repository into ``llvc_models/``, which puts the
checkpoint at ``models/checkpoints/llvc/G_500000.pth``. The matching ``config.json`` lives in
upstream's git repository (``experiments/llvc/config.json``); ``config/llvc.json`` here holds
the same values and is used when the snapshot carries no config of its own.

The hub is reached only for the download itself (``huggingface_hub``, optional extra
``download``). Everything after it - finding the files in a snapshot folder, checking the
checkpoint against the config with strict key matching, installing both atomically - is
:func:`install_from_snapshot`, which ``--from-snapshot DIR`` runs on a local folder offline.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from common.files import atomic_path

HUB_REPO = "KoeAI/llvc"
CHECKPOINT_IN_SNAPSHOT = "models/checkpoints/llvc/G_500000.pth"
# Where a config may sit in a snapshot, most specific first.
CONFIG_IN_SNAPSHOT = ("models/checkpoints/llvc/config.json", "experiments/llvc/config.json", "config.json")
DEFAULT_OUT = Path("checkpoints/llvc")


class DownloadError(RuntimeError):
    """The download or the installation of a snapshot failed (one line)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``llvc download``'s flags on ``p``."""
    p.add_argument("--repo", default=HUB_REPO, help=f"hub repository (default {HUB_REPO})")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("-o", "--out-dir", default=str(DEFAULT_OUT),
                   help=f"where G_500000.pth and config.json go (default {DEFAULT_OUT})")
    p.add_argument("--from-snapshot", metavar="DIR",
                   help="install from a local folder laid out like the hub snapshot (no network)")


def fetch_snapshot(repo: str, revision: str | None, cache_dir: Path) -> Path:
    """Download the checkpoint (and any config) of ``repo`` into ``cache_dir``; returns the folder."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise DownloadError("huggingface_hub is not installed: pip install -e '.[download]' "
                            "(or fetch G_500000.pth by hand and use --from-snapshot)") from None
    try:
        return Path(snapshot_download(repo_id=repo, revision=revision, local_dir=cache_dir,
                                      allow_patterns=[CHECKPOINT_IN_SNAPSHOT, *CONFIG_IN_SNAPSHOT]))
    except Exception as exc:  # network, auth, missing repo: all end the same way
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DownloadError(f"cannot download {repo} from the Hugging Face hub ({reason}); "
                            f"without network, copy {CHECKPOINT_IN_SNAPSHOT} by hand and use "
                            f"--from-snapshot DIR") from None


def install_from_snapshot(snapshot: Path, out_dir: Path) -> tuple[Path, Path]:
    """Check and install a snapshot's checkpoint and config into ``out_dir``.

    The checkpoint must load into the config's model with strict key and shape matching;
    nothing is written unless it does. Returns the installed (checkpoint, config) paths.
    """
    from models.checkpoint import check_state_dict, read_state_dict
    from models.config import DEFAULT_CONFIG_PATH, load_config
    from models.llvc import LLVC

    snapshot = Path(snapshot)
    if not snapshot.is_dir():
        raise DownloadError(f"{snapshot}: not a folder")
    ckpt = snapshot / CHECKPOINT_IN_SNAPSHOT
    if not ckpt.is_file():
        raise DownloadError(f"{snapshot}: no {CHECKPOINT_IN_SNAPSHOT} in the snapshot")
    config = next((snapshot / c for c in CONFIG_IN_SNAPSHOT if (snapshot / c).is_file()), DEFAULT_CONFIG_PATH)
    check_state_dict(LLVC(load_config(config)), read_state_dict(ckpt), str(ckpt))

    out_dir.mkdir(parents=True, exist_ok=True)
    installed = []
    for src, name in ((ckpt, ckpt.name), (config, "config.json")):
        dst = out_dir / name
        try:
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
        except OSError as exc:
            raise DownloadError(f"{dst}: cannot write ({exc.strerror or exc})") from None
        installed.append(dst)
    return installed[0], installed[1]


def run(args: argparse.Namespace) -> int:
    """Execute ``llvc download``; returns the exit status."""
    out_dir = Path(args.out_dir)
    try:
        if args.from_snapshot:
            ckpt, config = install_from_snapshot(Path(args.from_snapshot), out_dir)
        else:
            with tempfile.TemporaryDirectory(prefix="llvc-hub-") as tmp:
                ckpt, config = install_from_snapshot(fetch_snapshot(args.repo, args.revision, Path(tmp)), out_dir)
    except (DownloadError, ValueError) as exc:  # ValueError: ConfigError, CheckpointError
        print(f"llvc download: error: {exc}", file=sys.stderr)
        return 1
    print(f"installed {ckpt} and {config}")
    print(f"use it: llvc convert -p {ckpt} -c {config} -f INPUT")
    return 0

"""Where the app keeps its data (``SOFTCAM_HOME``, ``SOFTCAM_DB_URL``) and, apart from it, its keys (``SOFTCAM_KEY_DIR``)."""

from __future__ import annotations

import os
from pathlib import Path


def softcam_home() -> Path:
    """Data directory (``SOFTCAM_HOME``, default ``./.softcam``); created on first use."""
    home = Path(os.environ.get("SOFTCAM_HOME") or Path.cwd() / ".softcam").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def db_url() -> str:
    """SQLAlchemy URL of the database (``SOFTCAM_DB_URL``, default SQLite file inside ``SOFTCAM_HOME``)."""
    return os.environ.get("SOFTCAM_DB_URL") or f"sqlite:///{softcam_home() / 'softcam.db'}"


def models_dir() -> Path:
    """Folder holding checkpoints (demo models and trained ones)."""
    path = softcam_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def demo_dir() -> Path:
    """Folder holding the demo cohorts, one sub-folder per modality."""
    path = softcam_home() / "demo"
    path.mkdir(parents=True, exist_ok=True)
    return path


def images_dir() -> Path:
    """Folder holding imported (de-identified) image files, addressed by content hash."""
    path = softcam_home() / "images"
    path.mkdir(parents=True, exist_ok=True)
    return path


def import_root() -> Path | None:
    """The only server folder the app's "folder on the server" import reads under
    (``SOFTCAM_IMPORT_ROOT``), or None: no server-folder import from the app (the field is hidden)."""
    configured = os.environ.get("SOFTCAM_IMPORT_ROOT")
    return Path(configured).expanduser().resolve() if configured else None


def within(path: Path, root: Path) -> bool:
    """True when ``path``, with every symbolic link resolved, lies in ``root`` (itself included)."""
    try:
        resolved = Path(path).resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    return resolved == root or root in resolved.parents


def key_dir() -> Path:
    """Folder of the server's secrets (pseudonym, file-name and sign-in keys), apart from the data they
    protect: ``SOFTCAM_KEY_DIR``, else ``$XDG_CONFIG_HOME/softcam-review/keys/<id of SOFTCAM_HOME>``
    (``~/.config`` without XDG_CONFIG_HOME), so that a copy of ``SOFTCAM_HOME`` or of the database
    holds no key. Created with mode 0700."""
    configured = os.environ.get("SOFTCAM_KEY_DIR")
    if configured:
        path = Path(configured).expanduser().resolve()
    else:
        import hashlib

        config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config").expanduser()
        home_id = hashlib.sha256(str(softcam_home()).encode("utf-8", "surrogatepass")).hexdigest()[:16]
        path = config / "softcam-review" / "keys" / home_id
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    home = softcam_home()
    if path == home or home in path.parents:
        raise RuntimeError(f"the key folder {path} lies inside the data folder {home}; set SOFTCAM_KEY_DIR elsewhere")
    return path


def secret_key(file_name: str, env_var: str, legacy: bytes | None = None) -> bytes:
    """A server secret: the environment variable ``env_var`` when set, else ``<key_dir()>/<file_name>``,
    made on first use (64 random hex characters, or ``legacy``, a key this server used before, as
    hex; mode 0600). Two processes starting together agree on one key: the file appears complete or
    not at all (written aside, flushed, then hard-linked into place)."""
    import secrets
    import tempfile

    value = os.environ.get(env_var)
    if value:
        return value.encode("utf-8")
    folder = key_dir()
    path = folder / file_name
    moved = softcam_home() / file_name  # where versions before the key folder kept it
    if not path.exists() and moved.is_file() and moved.read_text().strip():
        legacy = moved.read_text().strip().encode("ascii")
    if not path.exists():
        fd, scratch = tempfile.mkstemp(dir=folder, prefix=f".{file_name}.")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(legacy.decode("ascii") if legacy else secrets.token_hex(32))
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(scratch, 0o600)
            try:
                os.link(scratch, path)
            except FileExistsError:  # another process made it first: use theirs
                pass
        finally:
            os.unlink(scratch)
    if moved.is_file() and path.exists():
        moved.unlink(missing_ok=True)  # the key no longer sits beside the data it protects
    return path.read_text().strip().encode("utf-8")

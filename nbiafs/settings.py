"""Mount settings from outside the command line: the config file and `-o` mount options.

Precedence: command-line flags, then `-o` options, then the config file, then built-in
defaults. Both use the long option names, with `_` or `-`:

    # ~/.config/nbiafs/config.toml  (or $NBIAFS_CONFIG, or --config FILE)
    url = "tcia"
    cache_dir = "/scratch/nbiafs"
    cache_size = "200G"
    timeout = 30

    nbiafs mount ~/tcia -o cache_size=200G,timeout=30,allow_other

Standard mount options that mean nothing here (`ro`, `rw`, `defaults`, `auto`, `noauto`, `user`,
`users`, `nofail`, `_netdev`, `nosuid`, `nodev`, `noexec`, `exec`, `suid`, `dev`, `x-…`,
`comment=…`) are accepted and ignored: the mount is read-only whatever they say. Passwords
are never settings: credentials come from the environment, ~/.netrc or a prompt.
"""

from __future__ import annotations

import os
import sys
from typing import Any
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9 and 3.10
    import tomli as tomllib


class SettingsError(Exception):
    """A bad config file or option: one line for the user."""


# setting -> kind: "str", "float", "int", "bool"
MOUNT_SETTINGS = {
    "url": "str", "api": "str", "user": "str", "cache_dir": "str", "cache_size": "str",
    "insecure": "bool", "timeout": "float", "log_level": "str", "log_file": "str",
    "connections": "int", "no_prefetch": "bool", "no_verify_md5": "bool", "allow_other": "bool", "foreground": "bool",
    "names": "str", "previews": "bool", "shared_cache": "str", "source": "str", "idc_index": "str",
    "collection": "list", "modality": "list", "manifest": "str", "cart": "str",
}
IGNORED_MOUNT_OPTIONS = {"ro", "rw", "defaults", "auto", "noauto", "user", "users", "nouser", "nofail",
                         "_netdev", "nosuid", "nodev", "noexec", "exec", "suid", "dev", "noatime",
                         "relatime", "atime", "nodiratime", "async", "sync"}
SECRET_KEYS = {"password", "passwd", "pass", "token", "aws_secret_access_key", "secret_key", "aws_session_token"}


def default_config_path() -> Path:
    env = os.environ.get("NBIAFS_CONFIG")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "nbiafs" / "config.toml"


def _convert(source: str, key: str, value, kind: str):
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("", "1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if kind == "list":  # of strings: a TOML array, or one value (repeatable in -o)
            values = value if isinstance(value, list) else [value]
            if not values or not all(isinstance(v, str) and v for v in values):
                raise ValueError
            return list(values)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            result = float(value)
            if result < 0:
                raise ValueError
            return result
        if isinstance(value, (dict, list)):
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{source}: {key} = {value!r} is not a valid {kind}") from None


def _setting(source: str, key: str, value) -> tuple[str, object]:
    name = key.replace("-", "_")
    if name in SECRET_KEYS:
        where = ("AWS_SECRET_ACCESS_KEY or ~/.aws/credentials" if name.startswith(("aws", "secret"))
                 else "NBIA_PASSWORD, ~/.netrc or the prompt")
        raise SettingsError(f"{source}: {key}: passwords and tokens are never settings; use {where}")
    if name not in MOUNT_SETTINGS:
        raise SettingsError(f"{source}: unknown setting {key!r} (known: {', '.join(sorted(MOUNT_SETTINGS))})")
    return name, _convert(source, key, value, MOUNT_SETTINGS[name])


def load_config_file(path: Path | None = None, required: bool = False) -> dict:
    """The settings of the config file; {} when there is none (unless `required`)."""
    path = path or default_config_path()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if required:
            raise SettingsError(f"config file {path} does not exist") from None
        return {}
    except OSError as exc:
        raise SettingsError(f"config file {path}: {exc.strerror}") from None
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"config file {path}: {exc}") from None
    return dict(_setting(str(path), key, value) for key, value in table.items())


def parse_mount_options(text: str) -> dict:
    """`-o a=1,b,c=x` as settings; standard mount options ignored (see the module docstring)."""
    out: dict[str, Any] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, _, value = item.partition("=")
        if key in IGNORED_MOUNT_OPTIONS or key.startswith("x-") or key == "comment":
            continue
        name, converted = _setting("-o", key, value if "=" in item else True)
        if MOUNT_SETTINGS[name] == "list":
            converted = out.get(name, []) + converted
        out[name] = converted
    return out

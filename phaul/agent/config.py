"""The agent's configuration file, `/etc/phaul/agent.toml`: read, checked, written.

`load_config(path)` gives the `AgentConfig` the agent runs with (the one
configuration object of phaul.config, re-exported here); `render_config(cfg)`
writes the file that loads back as the same `cfg` (`phaul host add` writes
new hosts' files with it). The command line's flags override the file: the
CLI hands the flags it was given to `load_config` as `overrides`, in the
file's own shape. The format::

    name = "alpha"                       # this host's name, as in its certificate (required)
    listen = "10.0.0.11:7473"            # HOST:PORT served with mutual TLS (required): IPv4, [IPv6] or a host name
    advertise = "10.0.0.11:7473"         # HOST[:PORT] peers dial back (default: listen; required when listen is 0.0.0.0 or [::])
    socket = "/run/phaul/agent.sock"     # the local CLI's unix socket ("" for none; this is the default)
    state_dir = "/var/lib/phaul"
    cache_dir = "/var/cache/phaul/rootfs"
    bridge = "br0"                       # containers with --ip are plugged into it
    build_netns = "/proc/1/ns/net"       # optional
    workload_dir = "/usr/local/lib/phaul/workloads"  # optional
    peers = ["beta", "gamma"]            # hosts this one migrates to and from
    admins = ["admin"]                   # client certificate names that manage this agent
    revoked = "/etc/phaul/pki/revoked.txt"  # default: revoked.txt beside cert when it lives beside ca; "" for none

    [tls]                                # required
    cert = "/etc/phaul/pki/alpha.crt"
    key = "/etc/phaul/pki/alpha.key"
    ca = "/etc/phaul/pki/ca.crt"

    [timeouts]                           # seconds; any subset (phaul.config.Timeouts)
    gate = 300.0
    link = 30.0
    resolve_interval = 15.0

    [limits]                             # any subset (phaul.config.Limits, and max_migrations)
    max_migrations = 4

Relative paths are relative to the file's directory. Addresses are kept as
strings and checked by phaul.endpoint (IPv4, [IPv6], host names). An unknown key, a value
of the wrong type or a missing required key is an `InvalidInput` naming the
key and the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from phaul.channels.revocation import default_list
from phaul.channels.transport import Credentials
from phaul.config import AgentConfig, Limits, Timeouts
from phaul.endpoint import agent_endpoints
from phaul.errors import InvalidInput
from phaul.validate import check_id

__all__ = ["AgentConfig", "DEFAULT_CONFIG", "DEFAULT_SOCKET", "load_config", "render_config", "config_from", "restart_needed"]

DEFAULT_CONFIG = Path("/etc/phaul/agent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/phaul")
DEFAULT_SOCKET = Path("/run/phaul/agent.sock")  # served when the agent runs from a file; the CLI's default agent
FORMAT_HINT = "see the format in `phaul agent --help` and phaul/agent/config.py"

# key -> (kind, flag): kind is how the value is checked; flag names the command-line option that sets it.
_TOP: dict[str, tuple[str, str]] = {
    "name": ("str", "--name"), "listen": ("str", "--listen"), "advertise": ("str", "--advertise"),
    "socket": ("path?", "--socket"), "state_dir": ("path", "--state-dir"), "cache_dir": ("path", "--cache-dir"),
    "bridge": ("str?", "--bridge"), "build_netns": ("path?", "--build-netns"), "workload_dir": ("path?", "--workload-dir"),
    "peers": ("names", "--peers"), "admins": ("names", "--admins"), "revoked": ("path?", "--revoked"),
}
_TLS: dict[str, tuple[str, str]] = {"cert": ("path", "--cert"), "key": ("path", "--key"), "ca": ("path", "--ca")}
_TIMEOUTS: dict[str, tuple[str, str]] = {f.name: ("seconds", "") for f in dataclasses.fields(Timeouts)}
_BYTES = {"quota_extra", "disk_reserve"}  # limits in bytes, where 0 is meaningful
_LIMITS: dict[str, tuple[str, str]] = {
    "max_migrations": ("count", ""),
    **{f.name: ("number" if f.type in ("float", float) else "bytes" if f.name in _BYTES else "count", "")
       for f in dataclasses.fields(Limits)},
}
_TABLES: dict[str, dict[str, tuple[str, str]]] = {"tls": _TLS, "timeouts": _TIMEOUTS, "limits": _LIMITS}


def load_config(path: Path, overrides: Mapping[str, Any] | None = None) -> AgentConfig:
    """The configuration in the TOML file `path`, with `overrides` (the same shape as
    the file: {"name": ..., "tls": {"cert": ...}}) taking precedence over it.
    InvalidInput naming the file and the key when the file cannot be read or is wrong."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as e:
        raise InvalidInput(
            f"cannot read the agent's configuration {path}: {e.strerror}",
            f"write it (e.g. `phaul agent install-unit` names it), or give another with --config; {FORMAT_HINT}",
        ) from e
    except tomllib.TOMLDecodeError as e:
        raise InvalidInput(f"{path} is not valid TOML: {e}", f"fix the file; {FORMAT_HINT}") from e
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{path} is not UTF-8 text: {e}", f"fix the file; {FORMAT_HINT}") from e
    checked = _check_document(doc, str(path), base=path.absolute().parent)
    merged = _merge(checked, dict(overrides or {}))
    merged.setdefault("socket", DEFAULT_SOCKET)  # an agent run from a file serves the local CLI
    return config_from(merged, str(path))


def config_from(values: Mapping[str, Any], source: str) -> AgentConfig:
    """An AgentConfig from checked values in the file's shape (from `load_config`, or the
    command line's flags alone, with `source` naming where they came from)."""
    tls = dict(values.get("tls") or {})

    def need(value: Any, key: str) -> Any:
        if value is None:
            section, _, name = key.rpartition(".")
            flag = (_TABLES[section] if section else _TOP)[name][1]
            raise InvalidInput(f"no `{key}` in {source}", f"set {key} in the configuration file, or give {flag}")
        return value

    name = check_id(need(values.get("name"), "name"), "host name")
    listen = need(values.get("listen"), "listen")
    keys = ("--listen", "--advertise") if source == "the command line" else (f"`listen` in {source}", f"`advertise` in {source}")
    agent_endpoints(listen, values.get("advertise"), listen_what=keys[0], advertise_what=keys[1])  # phaul.endpoint
    cert, key, ca = (need(tls.get(k), f"tls.{k}") for k in ("cert", "key", "ca"))
    revoked = values["revoked"] if "revoked" in values else default_list(cert, ca)
    limits = dict(values.get("limits") or {})
    max_migrations = limits.pop("max_migrations", AgentConfig.max_migrations)
    return AgentConfig(
        name=name, listen=listen, advertise=values.get("advertise"),
        state_dir=values.get("state_dir", DEFAULT_STATE_DIR), creds=Credentials(name, cert, key, ca),
        socket=values.get("socket"), bridge=values.get("bridge"), cache_dir=values.get("cache_dir", AgentConfig.cache_dir),
        build_netns=values.get("build_netns"), workload_dir=values.get("workload_dir"),
        peers=frozenset(values.get("peers", ())), admins=frozenset(values.get("admins", ())),
        timeouts=Timeouts(**dict(values.get("timeouts") or {})), max_migrations=max_migrations,
        revoked=revoked, limits=Limits(**limits),
    )


def render_config(cfg: AgentConfig) -> str:
    """`cfg` as agent.toml: `load_config` of the text gives `cfg` back (paths are written as
    they are: give absolute ones). Every timeout and limit is written, so the file shows them."""
    lines = ["# phaul agent configuration (phaul/agent/config.py describes every key)"]
    top: dict[str, Any] = {
        "name": cfg.name, "listen": cfg.listen, "advertise": cfg.advertise, "socket": _opt(cfg.socket),
        "state_dir": cfg.state_dir, "cache_dir": cfg.cache_dir, "bridge": cfg.bridge, "build_netns": cfg.build_netns,
        "workload_dir": cfg.workload_dir, "peers": sorted(cfg.peers), "admins": sorted(cfg.admins),
        "revoked": _opt(cfg.revoked),
    }
    lines += [f"{k} = {_toml(v)}" for k, v in top.items() if v is not None]
    tables: dict[str, dict[str, Any]] = {
        "tls": {"cert": cfg.creds.cert, "key": cfg.creds.key, "ca": cfg.creds.ca},
        "timeouts": dataclasses.asdict(cfg.timeouts),
        "limits": {"max_migrations": cfg.max_migrations, **dataclasses.asdict(cfg.limits)},
    }
    for table, values in tables.items():
        lines += ["", f"[{table}]", *(f"{k} = {_toml(v)}" for k, v in values.items())]
    return "\n".join(lines) + "\n"


RELOADED = ("peers", "admins", "revoked")  # what SIGHUP changes (phaul.agent.host.Host.reload)


def restart_needed(old: AgentConfig, new: AgentConfig) -> list[str]:
    """The settings that differ between `old` and `new` and that only a restart applies."""
    return [f.name for f in dataclasses.fields(AgentConfig)
            if f.name not in RELOADED and getattr(old, f.name) != getattr(new, f.name)]


# -- checking ------------------------------------------------------------------------


def _opt(path: Path | None) -> Path | str:
    """An optional path as the file holds it: "" means none (a missing key means the default)."""
    return "" if path is None else path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf" if value < 0 else "nan")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string: JSON's escapes are TOML's


def _check_document(doc: dict[str, Any], source: str, base: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if key in _TABLES:
            if not isinstance(value, dict):
                raise _wrong(source, key, "a table ([" + key + "])", value)
            out[key] = {k: _check_value(source, f"{key}.{k}", _kind(source, key, k), v, base) for k, v in value.items()}
        else:
            out[key] = _check_value(source, key, _kind(source, "", key), value, base)
    return out


def _kind(source: str, table: str, key: str) -> str:
    keys = _TABLES[table] if table else _TOP
    if key not in keys:
        where = f"[{table}]" if table else "the top level"
        known = ", ".join([*keys, *([f"[{t}]" for t in _TABLES] if not table else [])])
        raise InvalidInput(f"unknown key `{f'{table}.' if table else ''}{key}` in {source}",
                           f"remove it or spell it as one of {where}'s keys: {known}")
    return keys[key][0]


def _check_value(source: str, key: str, kind: str, value: Any, base: Path) -> Any:
    check = _CHECKS[kind.rstrip("?")]
    if kind.endswith("?") and value == "":
        return None
    return check(source, key, value, base)


def _wrong(source: str, key: str, want: str, value: Any) -> InvalidInput:
    got = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array", dict: "a table"}
    return InvalidInput(
        f"`{key}` in {source} must be {want}, not {got.get(type(value), type(value).__name__)} ({value!r:.60})",
        f"fix `{key}`; {FORMAT_HINT}",
    )


def _str(source: str, key: str, value: Any, base: Path) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise _wrong(source, key, "a non-empty string", value)
    return value


def _path(source: str, key: str, value: Any, base: Path) -> Path:
    return base / _str(source, key, value, base)  # an absolute value stays as it is


def _names(source: str, key: str, value: Any, base: Path) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _wrong(source, key, 'an array of names (["beta", "gamma"])', value)
    try:
        return [check_id(v, "certificate name") for v in value]
    except InvalidInput as e:
        raise InvalidInput(f"`{key}` in {source}: {e.message}", e.hint) from e


def _number(source: str, key: str, value: Any, base: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise _wrong(source, key, "a number of 0 or more", value)
    return float(value)


def _count(source: str, key: str, value: Any, base: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _wrong(source, key, "a whole number of 1 or more", value)
    return value


def _bytes(source: str, key: str, value: Any, base: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _wrong(source, key, "a whole number of bytes, 0 or more", value)
    return value


_CHECKS: dict[str, Callable[[str, str, Any, Path], Any]] = {
    "str": _str, "path": _path, "names": _names, "seconds": _number, "number": _number, "count": _count, "bytes": _bytes,
}


def _merge(doc: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(doc)
    for key, value in overrides.items():
        out[key] = {**out.get(key, {}), **value} if key in _TABLES else value
    return out

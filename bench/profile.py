"""Profiles: TOML files that say what to run, validated once at load (schema: profiles/README.md).

Every value is checked against the schema below; unknown keys, wrong types and out-of-range
values are refused with a `ProfileError` naming the file, the key, the value and what is allowed
(with a did-you-mean for misspelt keys). A loaded `Profile` is frozen; `--set key=value`
overrides go through the same validation.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import ProfileError
from engine.approval import ApprovalPolicy
from engine.distribution import Distribution
from engine.keys import KEY_SPECS
from engine.system import EngineConfig

# A source checkout keeps profiles/ beside bench/; an installed wheel carries them in bench/.
_CHECKOUT = Path(__file__).resolve().parent.parent / "profiles"
_INSTALLED = Path(__file__).resolve().parent / "profiles"
PROFILE_DIRECTORY = _CHECKOUT if _CHECKOUT.is_dir() else _INSTALLED


@dataclass(frozen=True, slots=True)
class Rule:
    """One key of the schema: its default, a check, and the words that say what is allowed.

    `check` returns False for a value outside `allowed`, or raises ValueError whose message says
    what is wrong when a fixed phrase cannot (a delay table's parameters).
    """

    default: Any
    allowed: str
    check: Callable[[Any], bool]
    doc: str


def _choice(*options: str) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and value in options


def _integer(low: int, high: int) -> Callable[[Any], bool]:
    return lambda value: type(value) is int and low <= value <= high


def _number(low: float, high: float) -> Callable[[Any], bool]:
    return lambda value: type(value) in (int, float) and low <= value <= high


def _boolean(value: Any) -> bool:
    return type(value) is bool


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _key_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(v in KEY_SPECS for v in value)


DISTRIBUTION_KINDS = ("fixed", "uniform", "exponential", "lognormal")
_DISTRIBUTION_KEYS = ("kind", "mean", "low", "high", "sigma")


def _distribution(value: Any) -> bool:
    """A delay table; what is wrong with it is raised as ValueError, so the message says why."""
    _make_distribution(value)
    return True


def _make_distribution(value: Any) -> Distribution:
    """The engine's Distribution from a profile table, passing only the parameters given.

    The engine refuses a parameter a kind ignores and requires the ones it needs; its message
    (naming the kind and the parameter) is what the user sees.
    """
    if not isinstance(value, dict):
        raise ValueError(f"expected a table {{kind = {'|'.join(DISTRIBUTION_KINDS)}, ...}}")
    unknown = sorted(set(value) - set(_DISTRIBUTION_KEYS))
    if unknown:
        raise ValueError(
            f"unknown parameter {unknown[0]!r}{_suggest(unknown[0], _DISTRIBUTION_KEYS)}; "
            f"a delay table takes {', '.join(_DISTRIBUTION_KEYS)}"
        )
    kind = value.get("kind")
    if kind not in DISTRIBUTION_KINDS:
        raise ValueError(f"kind = {kind!r}: expected one of {'|'.join(DISTRIBUTION_KINDS)}")
    numbers: dict[str, float] = {}
    for key, number in value.items():
        if key == "kind":
            continue
        if type(number) not in (int, float):
            raise ValueError(f"{key} = {number!r}: expected a number of seconds")
        numbers[key] = float(number)
    return Distribution(kind, **numbers)


TARGET_SCHEMES = ("est+https", "est+http", "scep+http")


def _target_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    if value in ("embedded", "served"):
        return True
    scheme, _, rest = value.partition("://")
    return scheme in TARGET_SCHEMES and bool(rest.split("/", 1)[0])


def _pkcs11_uri(value: Any) -> bool:
    return isinstance(value, str) and (value == "" or value.startswith("pkcs11:"))


def _ldap_url(value: Any) -> bool:
    return isinstance(value, str) and (value == "" or value.startswith(("ldap://", "ldaps://")))


def _postgresql_url(value: Any) -> bool:
    return isinstance(value, str) and (
        value == "" or (value.startswith("postgresql://") and ":" not in value[13:].split("@")[0])
    )


def _env_name(value: Any) -> bool:
    return isinstance(value, str) and (value == "" or value.replace("_", "A").isalnum())


def _path_text(value: Any) -> bool:
    return isinstance(value, str) and "\0" not in value


_KEYS = ", ".join(KEY_SPECS)
_DIST = "a delay table: kind (fixed, uniform, exponential, lognormal) and its parameters"
NO_DELAY = {"kind": "fixed", "mean": 0.0}

SCHEMA: dict[str, dict[str, Rule]] = {
    "": {
        "description": Rule(
            None, "a non-empty string", _text, "one line: what this profile is for"
        ),
        "seed": Rule(1, "an integer", _integer(-(2**63), 2**63 - 1), "seeds users, keys, delays"),
    },
    "ca": {
        "profile_id": Rule(None, "a non-empty string", _text, "CA profile ID (default: the name)"),
        "key": Rule("p256", _KEYS, _choice(*KEY_SPECS), "the CA's key type"),
        "hash": Rule(
            "sha256",
            "sha256, sha384, sha512",
            _choice("sha256", "sha384", "sha512"),
            "signature hash of CA and devices (Ed25519 ignores it)",
        ),
        "intermediates": Rule(
            0,
            "an integer from 0 to 4",
            _integer(0, 4),
            "intermediate CAs between root and issuing CA",
        ),
        "validity_days": Rule(
            365, "an integer from 1 to 3650", _integer(1, 3650), "end-entity certificate lifetime"
        ),
        "signing": Rule(
            "memory",
            "memory, softhsm, pkcs11",
            _choice("memory", "softhsm", "pkcs11"),
            "the issuing CA's key in memory, in a SoftHSM2 token made for the run, or in your "
            "PKCS #11 token (ca.pkcs11_*)",
        ),
        "pkcs11_module": Rule(
            "", "a path, or empty", _path_text, "ca.signing = pkcs11: the token's PKCS #11 module"
        ),
        "pkcs11_uri": Rule(
            "",
            "an RFC 7512 pkcs11: URI naming the token and the key, or empty",
            _pkcs11_uri,
            "ca.signing = pkcs11: the issuing CA's key (the CA certificate is made for it)",
        ),
        "pkcs11_pin_env": Rule(
            "", "an environment variable name, or empty", _env_name, "the token's user PIN"
        ),
        "allowed_keys": Rule(
            list(KEY_SPECS),
            f"a non-empty list of {_KEYS}",
            _key_list,
            "device key types the CA accepts (RSA below 2048 never)",
        ),
    },
    "device": {
        "key": Rule("p256", _KEYS, _choice(*KEY_SPECS), "device key type"),
        "crypto": Rule(
            "precomputed",
            "precomputed, live",
            _choice("precomputed", "live"),
            "keys and requests from the corpus, or made during the run",
        ),
        "request_path": Rule(
            "template",
            "template, builder",
            _choice("template", "builder"),
            "how a live device builds its PKCS #10 request",
        ),
        "key_protection": Rule(
            "pkcs8-encrypted",
            "pkcs8-encrypted, none",
            _choice("pkcs8-encrypted", "none"),
            "how step 5 protects the stored key pair",
        ),
    },
    "approval": {
        "mode": Rule(
            "auto",
            "auto, administrator",
            _choice("auto", "administrator"),
            "issue at once, or wait for an administrator",
        ),
        "administrators": Rule(
            2,
            "an integer from 1 to 10000",
            _integer(1, 10_000),
            "administrators reviewing in parallel",
        ),
        "approval_rate": Rule(
            1.0, "a number from 0 to 1", _number(0.0, 1.0), "share of requests approved"
        ),
        "delay": Rule(
            {"kind": "lognormal", "mean": 0.5, "sigma": 0.5},
            _DIST,
            _distribution,
            "time one review takes",
        ),
    },
    "cache": {
        "ttl_seconds": Rule(
            300.0,
            "a number from 0.001 to 86400",
            _number(0.001, 86_400),
            "chain cache entry lifetime",
        ),
        "warm": Rule(True, "true or false", _boolean, "fill the chain cache before the clock"),
        "fetch_latency": Rule(NO_DELAY, _DIST, _distribution, "CA chain fetch on a miss"),
    },
    "auth": {
        "iterations": Rule(
            1,
            "an integer from 1 to 1000000",
            _integer(1, 1_000_000),
            "PBKDF2 iterations of the password verifier",
        ),
    },
    "link": {
        "latency": Rule(NO_DELAY, _DIST, _distribution, "one hop over the wireless link"),
    },
    "load": {
        "mode": Rule(
            "closed",
            "closed, open",
            _choice("closed", "open"),
            "fixed concurrency, or a target arrival rate",
        ),
        "concurrency": Rule(
            64,
            "an integer from 1 to 1000000",
            _integer(1, 1_000_000),
            "closed loop: devices in flight at once",
        ),
        "rate": Rule(
            500.0,
            "a number from 0.001 to 10000000",
            _number(0.001, 1e7),
            "open loop: target arrivals per second",
        ),
        "arrival": Rule(
            "constant",
            "constant, poisson",
            _choice("constant", "poisson"),
            "open loop: arrival process",
        ),
        "ramp_seconds": Rule(
            0.0,
            "a number from 0 to 86400",
            _number(0.0, 86_400),
            "open loop: linear ramp from 0 to rate",
        ),
        "devices": Rule(
            1000,
            "an integer from 1 to 100000000",
            _integer(1, 100_000_000),
            "devices to enroll (a duration-bound run cycles through them)",
        ),
        "duration": Rule(
            0.0,
            "a number from 0 to 86400 (0: until all devices are done)",
            _number(0.0, 86_400),
            "run length in seconds",
        ),
        "warmup_seconds": Rule(
            0.5,
            "a number from 0 to 3600, below load.duration when that is above 0",
            _number(0.0, 3600),
            "enrollments intended to start in this window are not measured",
        ),
        "workers": Rule(
            0, "an integer from 0 to 1024 (0: one per core)", _integer(0, 1024), "shard processes"
        ),
    },
    "expect": {
        "issued_fraction": Rule(
            1.0,
            "a number from 0 to 1",
            _number(0.0, 1.0),
            "share of started devices this profile expects issued",
        ),
        "tolerance": Rule(
            0.0,
            "a number from 0 to 1",
            _number(0.0, 1.0),
            "how far below issued_fraction the issued share may fall (sampling error)",
        ),
    },
    "serve": {
        "subject_policy": Rule(
            "match",
            "match, directory",
            _choice("match", "directory"),
            "served CA: the request's subject must be the user's DN, or the CA writes the DN",
        ),
        "approval": Rule(
            "simulated",
            "simulated, manual",
            _choice("simulated", "manual"),
            "served CA under approval: simulated administrators, or `enrollbench approve`",
        ),
    },
    "target": {
        "url": Rule(
            "embedded",
            "embedded, served, est+https://HOST:PORT/PATH, est+http://..., scep+http://...",
            _target_url,
            "the CA the run measures",
        ),
        "served_protocol": Rule(
            "est+https",
            "est+https, est+http, scep+http",
            _choice("est+https", "est+http", "scep+http"),
            "served target: the protocol the devices speak",
        ),
        "server_workers": Rule(
            0,
            "an integer from 0 to 1024 (0: one per core; the generator then gets a quarter)",
            _integer(0, 1024),
            "served target: the server's worker processes",
        ),
        "connection": Rule(
            "keep-alive",
            "keep-alive, per-device",
            _choice("keep-alive", "per-device"),
            "pooled connections (a gateway) or a new connection per device (a fleet)",
        ),
        "timeout": Rule(
            30.0, "a number from 0.01 to 3600", _number(0.01, 3600), "seconds per HTTP exchange"
        ),
        "poll_timeout": Rule(
            600.0,
            "a number from 0 to 86400",
            _number(0.0, 86_400),
            "seconds a device keeps polling a pending request",
        ),
        "allow_remote": Rule(
            False, "true or false", _boolean, "a target beyond loopback must be allowed here"
        ),
        "max_rate": Rule(
            20.0,
            "a number from 0.001 to 100000",
            _number(0.001, 100_000),
            "a remote target: the highest arrival rate (open loop) or concurrency allowed",
        ),
        "max_devices": Rule(
            1000,
            "an integer from 1 to 10000000",
            _integer(1, 10_000_000),
            "a remote target: the most devices a run may enroll",
        ),
        "password_env": Rule(
            "",
            "an environment variable name, or empty",
            _env_name,
            "every device's password from this variable (else the simulated users' own)",
        ),
        "challenge_env": Rule(
            "",
            "an environment variable name, or empty",
            _env_name,
            "SCEP: the challenge password from this variable (else each user's password)",
        ),
        "credentials_file": Rule(
            "", "a path, or empty", _path_text, "user_id:password lines for the devices"
        ),
        "ca_file": Rule(
            "", "a path, or empty", _path_text, "https targets: the CA certificates to trust"
        ),
    },
    "components": {
        "directory": Rule(
            "sqlite",
            "sqlite, ldap",
            _choice("sqlite", "ldap"),
            "the directory and messaging directory: embedded SQLite, or OpenLDAP",
        ),
        "ldap_url": Rule(
            "",
            "empty (a slapd started for the run) or ldap://HOST:PORT/",
            _ldap_url,
            "an existing directory (users under ou=people,dc=example,dc=com)",
        ),
        "ldap_password_env": Rule(
            "", "an environment variable name, or empty", _env_name, "its admin's password"
        ),
        "database": Rule(
            "sqlite",
            "sqlite, postgresql",
            _choice("sqlite", "postgresql"),
            "the configuration database and the CA's issued certificates: SQLite or PostgreSQL",
        ),
        "postgresql_url": Rule(
            "",
            "empty (a PostgreSQL started for the run) or postgresql://USER@HOST:PORT/DB",
            _postgresql_url,
            "an existing database (the password from postgresql_password_env)",
        ),
        "postgresql_password_env": Rule(
            "", "an environment variable name, or empty", _env_name, "its password"
        ),
    },
    "storage": {
        "database": Rule(
            "file",
            "file, memory",
            _choice("file", "memory"),
            "each shard's SQLite: a file in a temporary folder (memory stays flat), or in memory",
        ),
    },
}


@dataclass(frozen=True, slots=True)
class Profile:
    """A validated profile: its name, where it came from, and every value (defaults filled in)."""

    name: str
    source: str
    values: Mapping[str, Mapping[str, Any]] = field(repr=False)

    def get(self, section: str, key: str) -> Any:
        return self.values[section][key]

    def as_dict(self) -> dict[str, Any]:
        """The profile as run: every section, defaults included."""
        return {s: dict(v) for s, v in self.values.items()}

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the profile as run."""
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def engine_config(self, database: str = ":memory:") -> EngineConfig:
        """The engine's view of this profile."""
        approval = None
        if self.get("approval", "mode") == "administrator":
            approval = ApprovalPolicy(
                self.get("approval", "administrators"),
                _make_distribution(self.get("approval", "delay")),
                float(self.get("approval", "approval_rate")),
            )
        return EngineConfig(
            profile_id=self.get("ca", "profile_id"),
            device_key=self.get("device", "key"),
            hash_name=self.get("ca", "hash"),
            ca_key=self.get("ca", "key"),
            ca_intermediates=self.get("ca", "intermediates"),
            allowed_keys=frozenset(self.get("ca", "allowed_keys")),
            approval=approval,
            chain_cache_ttl=float(self.get("cache", "ttl_seconds")),
            warm_cache=self.get("cache", "warm"),
            ca_fetch_latency=_make_distribution(self.get("cache", "fetch_latency")),
            auth_iterations=self.get("auth", "iterations"),
            key_protection=self.get("device", "key_protection"),
            request_path=self.get("device", "request_path"),
            link_latency=_make_distribution(self.get("link", "latency")),
            validity_days=self.get("ca", "validity_days"),
            database=database,
            seed=self.get("", "seed"),
        )


def _suggest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def validate(raw: Mapping[str, Any], name: str, source: str) -> Profile:
    """Check every key and value of a parsed profile; fill in defaults."""
    values: dict[str, dict[str, Any]] = {section: {} for section in SCHEMA}
    for key, value in raw.items():
        if isinstance(value, dict) and key in SCHEMA and key:
            for inner, inner_value in value.items():
                _accept(values, key, inner, inner_value, source)
        else:
            _accept(values, "", key, value, source)
    for section, rules in SCHEMA.items():
        for key, rule in rules.items():
            values[section].setdefault(key, rule.default)
    if values[""]["description"] is None:
        raise ProfileError(
            f"{source}: 'description' is required: {SCHEMA['']['description'].allowed}"
        )
    if values["ca"]["profile_id"] is None:
        values["ca"]["profile_id"] = name
    _check_load_window(values["load"], source)
    return Profile(name, source, values)


def _check_load_window(load: Mapping[str, Any], source: str) -> None:
    """A duration-bound run must measure something after its warm-up."""
    duration, warmup = load["duration"], load["warmup_seconds"]
    if duration > 0 and warmup >= duration:
        raise ProfileError(
            f"{source}: load.warmup_seconds = {warmup!r} is not allowed: it must be below "
            f"load.duration = {duration!r} (nothing would be measured)"
        )


def _accept(
    values: dict[str, dict[str, Any]], section: str, key: str, value: Any, source: str
) -> None:
    rules = SCHEMA[section]
    dotted = f"{section}.{key}" if section else key
    if key not in rules:
        known = [f"{section}.{k}" if section else k for k in rules]
        if not section:
            known += [s for s in SCHEMA if s]
        raise ProfileError(f"{source}: unknown key {dotted!r}{_suggest(dotted, known)}")
    rule = rules[key]
    try:
        allowed = rule.check(value)
    except (TypeError, ValueError) as exc:
        raise ProfileError(f"{source}: {dotted} = {value!r} is not allowed: {exc}") from exc
    if not allowed:
        raise ProfileError(
            f"{source}: {dotted} = {value!r} is not allowed: expected {rule.allowed}"
        )
    values[section][key] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split `key=value`; the value is read as TOML (numbers, booleans, tables), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ProfileError(f"--set {text!r}: expected key=value")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `--set section.key=value` overrides to a parsed profile, before validation."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for text in overrides:
        dotted, value = parse_override(text)
        section, _, key = dotted.rpartition(".")
        if section:
            if section not in SCHEMA:
                raise ProfileError(
                    f"--set {dotted}: unknown section {section!r}{_suggest(section, list(SCHEMA))}"
                )
            merged.setdefault(section, {})[key] = value
        else:
            merged[key] = value
    return merged


def resolve(name_or_path: str, folder: Path = PROFILE_DIRECTORY, kind: str = "profile") -> Path:
    """A shipped file by name (`p256-auto`) from `folder`, or any path."""
    path = Path(name_or_path)
    candidate = path if path.suffix == ".toml" or path.exists() else folder / f"{path}.toml"
    if not candidate.is_file():
        shipped = sorted(p.stem for p in folder.glob("*.toml"))
        raise ProfileError(
            f"no {kind} {name_or_path!r}{_suggest(name_or_path, shipped)}; "
            f"shipped: {', '.join(shipped)}"
        )
    return candidate


def load_profile(name_or_path: str, overrides: Sequence[str] = ()) -> Profile:
    """Read, override and validate a profile."""
    path = resolve(name_or_path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from exc
    return validate(apply_overrides(raw, overrides), path.stem, str(path))


def shipped_profiles() -> list[Path]:
    return sorted(PROFILE_DIRECTORY.glob("*.toml"))

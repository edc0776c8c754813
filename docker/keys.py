#!/opt/venv/bin/python
"""TorchServe's token keys inside the container: print a valid one, renewing it when it is about to expire.

TorchServe 0.12 writes three keys into key_file.json at start: the inference key (for :8080),
the management key (for :8081) and an API key. The first two expire after `token_expiration_min`
minutes (default 60; TS_TOKEN_EXPIRATION_TIME_MIN=... on `docker run`); the API key does not. A key
is renewed by its token API, `GET :8081/token?type=inference|management` with the API key, which
rewrites key_file.json. A renewal invalidates the key it replaces at once, so a key is renewed
only when it has less than `--min-valid` seconds left (at most a quarter of its lifetime); until
then every caller gets the same one.

    docker exec <container> /app/docker/keys.py inference            # the key, renewed if needed
    docker exec <container> /app/docker/keys.py inference --json     # with its expiry time

The healthcheck (healthcheck.py) uses the management key the same way, so the container stays
healthy past the keys' first expiry.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

MANAGEMENT = os.environ.get("TS_MANAGEMENT_URL", "http://127.0.0.1:8081")
KEY_FILE = Path(os.environ.get("TS_KEY_FILE", "/home/serve/key_file.json"))
KINDS = ("inference", "management")
MIN_VALID_S = 300.0  # renew a key with less than this left: a client then has 5 minutes to use it
LIFETIME_ENV = "TS_TOKEN_EXPIRATION_TIME_MIN"  # TorchServe's token_expiration_min, set through the environment


def read_keys() -> dict | None:
    """key_file.json, or None when token authorization is off (TorchServe writes no file then)."""
    try:
        return json.loads(KEY_FILE.read_text())
    except FileNotFoundError:
        return None


def seconds_left(entry: dict) -> float:
    """Seconds until a key's "expiration time" (TorchServe writes nanoseconds and a Z)."""
    stamp = entry["expiration time"].rstrip("Z")
    whole, _, fraction = stamp.partition(".")
    expires = datetime.fromisoformat(whole).replace(tzinfo=timezone.utc)
    return expires.timestamp() + float(f"0.{fraction or 0}") - datetime.now(timezone.utc).timestamp()


def renew(kind: str) -> None:
    """Ask TorchServe for a new `kind` key (it rewrites key_file.json)."""
    api_key = read_keys()["API"]["key"]
    request = urllib.request.Request(f"{MANAGEMENT}/token?type={kind}", headers={"Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(request, timeout=4):
        pass


def valid_key(kind: str, min_valid_s: float = MIN_VALID_S) -> tuple[str, float] | None:
    """(key, seconds it stays valid) for `kind`, renewed first if it expires within `min_valid_s`;
    None when token authorization is off."""
    keys = read_keys()
    if keys is None:
        return None
    lifetime_s = 60 * float(os.environ.get(LIFETIME_ENV) or 60)
    if seconds_left(keys[kind]) < min(min_valid_s, lifetime_s / 4):
        renew(kind)
        keys = read_keys()
    return keys[kind]["key"], seconds_left(keys[kind])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--min-valid", type=float, default=MIN_VALID_S,
                        help="renew the key if it has fewer seconds than this left (default %(default)s)")
    parser.add_argument("--json", action="store_true", help='print {"key": ..., "expires_in_s": ...}')
    args = parser.parse_args()
    try:
        found = valid_key(args.kind, args.min_valid)
    except (OSError, urllib.error.URLError) as error:
        sys.exit(f"keys: could not renew the {args.kind} key: {error}")
    if found is None:
        sys.exit(f"keys: token authorization is off ({KEY_FILE} does not exist): no key is needed")
    key, left = found
    print(json.dumps({"key": key, "expires_in_s": round(left)}) if args.json else key)


if __name__ == "__main__":
    main()

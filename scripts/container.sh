#!/usr/bin/env bash
# Build, run and smoke-test the serving image with podman or docker (whichever is present).
#   bash scripts/container.sh base                # localhost/debian-base:bookworm via debootstrap (no registry needed)
#   bash scripts/container.sh build [native|ipex] # image torchserve-llm-cpu:<stack> (native by default)
#   bash scripts/container.sh run   [native|ipex] # serve on 127.0.0.1:${PORT:-8080} (metrics ${METRICS_PORT:-8082})
#   bash scripts/container.sh smoke [native|ipex] # build, run, wait for READY, generate, bad request -> 400, stop
# Environment: BASE_IMAGE (default: localhost/debian-base:bookworm when it exists, else
# debian:bookworm-slim), MODEL_CONFIG (a path inside the image, e.g. /app/configs/continuous.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
command="${1:-smoke}"
stack="${2:-native}"
image="torchserve-llm-cpu:${stack}"

if command -v podman >/dev/null; then
  engine=podman
  # runc: crun fails on hosts with hybrid cgroups; rlimits: raising them may not be permitted.
  run_flags=(--runtime runc run --ulimit nofile=1024:1024 --ulimit nproc=4096:4096)
  build_flags=(build --format docker --isolation chroot --network host)  # docker format keeps HEALTHCHECK
elif command -v docker >/dev/null; then
  engine=docker
  run_flags=(run)
  build_flags=(build)
else
  echo "container: neither podman nor docker is installed" >&2; exit 1
fi

base_image() {
  if [ -n "${BASE_IMAGE:-}" ]; then echo "$BASE_IMAGE"
  elif $engine image exists localhost/debian-base:bookworm 2>/dev/null \
       || $engine image inspect localhost/debian-base:bookworm >/dev/null 2>&1; then echo localhost/debian-base:bookworm
  else echo debian:bookworm-slim; fi
}

build_base() {
  # A Debian bookworm root filesystem from the host's apt mirror, imported as an image.
  local mirror rootfs
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  rootfs=$(mktemp -d)
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror"
  tar -C "$rootfs" -c . | $engine import - localhost/debian-base:bookworm
  rm -rf "$rootfs"
}

build() {
  local args=("${build_flags[@]}" -t "$image" --build-arg "STACK=$stack" --build-arg "BASE_IMAGE=$(base_image)")
  if [ "$engine" = podman ]; then
    # Reuse the host's pip downloads (make install filled them), its local wheels and CA bundle.
    mkdir -p "$HOME/.cache/pip"
    args+=(-v "$HOME/.cache/pip:/host-pip-cache" --build-arg PIP_CACHE_DIR=/host-pip-cache)
    [ -d /opt/wheels ] && args+=(-v /opt/wheels:/opt/wheels:ro --build-arg PIP_FIND_LINKS=/opt/wheels)
    [ -f /etc/ssl/certs/ca-certificates.crt ] && args+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/host-ca.crt:ro
                                                      --build-arg PIP_CERT=/etc/host-ca.crt)
  fi
  local started=$SECONDS
  $engine "${args[@]}" .
  echo "container: built $image in $((SECONDS - started)) s, size $($engine image inspect "$image" --format '{{.Size}}' | awk '{printf "%.2f GB", $1/1e9}')"
}

run_detached() {  # name host-port host-metrics-port [more run options]
  local name=$1 port=$2 metrics=$3
  shift 3
  $engine "${run_flags[@]}" -d --name "$name" -p "127.0.0.1:$port:8080" -p "127.0.0.1:$metrics:8082" \
    ${MODEL_CONFIG:+-e MODEL_CONFIG="$MODEL_CONFIG"} "$@" "$image" >/dev/null
}

# Packages of requirements/<stack>-dev.lock that must not be in the runtime image.
TEST_PACKAGES="pytest hypothesis locust flask gevent matplotlib kubernetes_validate openai"

healthy() {
  if [ "$engine" = podman ]; then podman healthcheck run "$1" >/dev/null 2>&1
  else [ "$(docker inspect --format '{{.State.Health.Status}}' "$1")" = healthy ]; fi
}

smoke() {
  # Token keys expire after KEY_EXPIRY_MIN minutes (TorchServe's default is 60): the run lasts
  # past 3 x that, so the healthcheck and a freshly obtained key are seen working after expiry.
  local name="llm-smoke-$$" port=18380 metrics=18382 started key fresh url status body expiry=${KEY_EXPIRY_MIN:-1}
  $engine image inspect "$image" >/dev/null 2>&1 || build
  $engine rm -f "$name" >/dev/null 2>&1 || true
  started=$SECONDS
  run_detached "$name" "$port" "$metrics" -e TS_TOKEN_EXPIRATION_TIME_MIN="$expiry"
  trap '$engine logs --tail 40 '"$name"' >&2 || true; $engine rm -f '"$name"' >/dev/null 2>&1 || true' EXIT
  until healthy "$name"; do
    if [ $((SECONDS - started)) -gt 300 ]; then echo "container: no READY worker after 300 s" >&2; exit 1; fi
    if [ "$($engine inspect --format '{{.State.Running}}' "$name")" != true ]; then
      echo "container: exited during start-up" >&2; exit 1
    fi
    sleep 2
  done
  echo "container: READY $((SECONDS - started)) s after start"
  $engine exec "$name" python -c 'import importlib.util, sys; found = [m for m in sys.argv[1:] if importlib.util.find_spec(m)]; sys.exit(f"test or benchmark packages in the image: {found}" if found else 0)' $TEST_PACKAGES
  echo "container: no test or benchmark package in the image ($TEST_PACKAGES)"
  key=$($engine exec "$name" /app/docker/keys.py inference)
  url="http://127.0.0.1:$port/predictions/smollm2"
  body=$(curl -sf "$url" -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
         -d '{"messages": [{"role": "user", "content": "Which city is the capital of France?"}], "max_new_tokens": 16}')
  echo "container: generated $body"
  python3 -c 'import json,sys; b=json.loads(sys.argv[1]); assert "Paris" in b["text"], b' "$body"
  status=$(curl -s -o /tmp/smoke-400.json -w '%{http_code}' "$url" -H "Authorization: Bearer $key" \
           -H 'Content-Type: application/json' -d '{"prompt": "Hi", "max_new_tokens": 0}')
  python3 -c 'import json,sys; e=json.load(open("/tmp/smoke-400.json"))["error"]; assert sys.argv[1] == "400" and e["field"] == "max_new_tokens", (sys.argv[1], e)' "$status"
  echo "container: bad request -> 400 naming max_new_tokens"
  status=$(curl -s -o /dev/null -w '%{http_code}' "$url" -H 'Content-Type: application/json' -d '{"prompt": "Hi"}')
  [ "$status" != 200 ] || { echo "container: a request without the token was served" >&2; exit 1; }
  echo "container: request without the token refused ($status)"
  # Past the keys' expiry: still healthy (the healthcheck renews its management key), the first
  # inference key refused, a fresh one from docker/keys.py served.
  while [ $((SECONDS - started)) -lt $((3 * 60 * expiry)) ]; do
    healthy "$name" || { echo "container: unhealthy $((SECONDS - started)) s after start" >&2; exit 1; }
    sleep 10
  done
  healthy "$name" || { echo "container: unhealthy after the keys expired" >&2; exit 1; }
  echo "container: still healthy $((SECONDS - started)) s after start (keys expire after $expiry min)"
  status=$(curl -s -o /dev/null -w '%{http_code}' "$url" -H "Authorization: Bearer $key" -H 'Content-Type: application/json' -d '{"prompt": "Hi", "max_new_tokens": 2}')
  [ "$status" = 400 ] || { echo "container: the expired inference key got $status, not 400" >&2; exit 1; }
  fresh=$($engine exec "$name" /app/docker/keys.py inference)
  status=$(curl -s -o /dev/null -w '%{http_code}' "$url" -H "Authorization: Bearer $fresh" -H 'Content-Type: application/json' -d '{"prompt": "Hi", "max_new_tokens": 2}')
  [ "$status" = 200 ] || { echo "container: a fresh inference key got $status" >&2; exit 1; }
  echo "container: expired key refused (400); a fresh one from docker/keys.py served (200)"
  key=$fresh
  # Graceful stop (docker/entrypoint.py): a request being generated when SIGTERM arrives finishes.
  local stream_file
  stream_file=$(mktemp)  # a fresh file: a stale one would pass the wait below before the request started
  curl -sN "$url" -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
       -d '{"prompt": "The history of the Roman empire", "max_new_tokens": 60, "stream": true}' > "$stream_file" &
  local streaming=$!
  until [ -s "$stream_file" ]; do sleep 0.1; done
  started=$SECONDS
  $engine stop -t 40 "$name" >/dev/null
  wait "$streaming"
  python3 -c 'import json, sys; last = json.loads(open(sys.argv[1]).read().splitlines()[-1]); assert last.get("completion_tokens") == 60, last' "$stream_file" \
    || { echo "container: the request in flight was cut by the stop" >&2; exit 1; }
  rm -f "$stream_file"
  [ "$($engine inspect --format '{{.State.ExitCode}}' "$name")" = 0 ] \
    || { echo "container: exit code $($engine inspect --format '{{.State.ExitCode}}' "$name") after SIGTERM" >&2; exit 1; }
  echo "container: SIGTERM with a request in flight: it finished, exit 0 after $((SECONDS - started)) s"
  trap - EXIT
  $engine rm -f "$name" >/dev/null
  echo "container: smoke test passed ($image, $($engine image inspect "$image" --format '{{.Size}}' | awk '{printf "%.2f GB", $1/1e9}'))"
}

case "$command" in
  base) build_base ;;
  build) build ;;
  run)
    $engine "${run_flags[@]}" --rm --name "llm-${stack}" -p "127.0.0.1:${PORT:-8080}:8080" \
      -p "127.0.0.1:${METRICS_PORT:-8082}:8082" ${MODEL_CONFIG:+-e MODEL_CONFIG="$MODEL_CONFIG"} "$image" ;;
  smoke) smoke ;;
  *) echo "usage: $0 base|build|run|smoke [ipex|native]" >&2; exit 2 ;;
esac

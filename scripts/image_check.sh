#!/usr/bin/env bash
# make image-check W=DIR: run the runtime image with a workdir's model mounted (DIR holds export/
# and features/), wait for its HEALTHCHECK to report healthy, call Retrieve through it from the
# host, check it runs as a non-root user, run the loadtest image against it for 10 s (where built),
# stop it with SIGTERM and check it exits 0.
# Uses the host network (Docker engines here run without a bridge) on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="$(cd "${1:?usage: scripts/image_check.sh WORKDIR (with export/ and features/)}" && pwd)"
image="${IMAGE:-nann-retrieval:latest}"
python="${PYTHON:-.venv/bin/python}"
name="nann-check-$$"
free_port() { "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port="$(free_port)"
metrics="$(free_port)"
user="$("$python" -c 'import numpy as np, sys; print(int(np.load(sys.argv[1])[0]))' "$workdir/features/users.npy")"

cleanup() { docker rm -f "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT
echo "\$ docker run -d --network host -v $workdir:/models:ro -e NANN_PORT=$port -e NANN_METRICS_PORT=$metrics $image"
docker run -d --name "$name" --network host -v "$workdir:/models:ro" \
    -e NANN_PORT="$port" -e NANN_METRICS_PORT="$metrics" "$image" >/dev/null

last=""
for _ in $(seq 1 120); do
    status="$(docker inspect --format '{{.State.Health.Status}}' "$name")"
    if [ "$status" != "$last" ]; then echo "$(date +%T) health: $status"; last="$status"; fi
    [ "$status" = healthy ] && break
    if [ "$(docker inspect --format '{{.State.Running}}' "$name")" != true ]; then
        docker logs "$name" | tail -20; echo "the container stopped" >&2; exit 1
    fi
    sleep 5
done
[ "$last" = healthy ] || { docker logs "$name" | tail -20; echo "not healthy after 600 s" >&2; exit 1; }
echo "healthcheck probes so far: $(docker inspect --format '{{range .State.Health.Log}}{{.ExitCode}}:{{.Output}} {{end}}' "$name" | tr '\n' ' ')"
echo "runs as: $(docker exec "$name" id)"
echo "\$ python -m server.client --target 127.0.0.1:$port --user $user --k 5"
"$python" -m server.client --target "127.0.0.1:$port" --user "$user" --k 5
echo "/metrics: $(curl -s "http://127.0.0.1:$metrics/metrics" | grep -E '^grpc_server_handled_total' | head -3)"
if docker image inspect nann-loadtest:latest >/dev/null 2>&1; then
    echo "\$ docker run --network host -v W/features:/features:ro -e NANN_LOADTEST_FEATURES=/features" \
        "nann-loadtest --headless -u 2 -r 2 -t 10s --host 127.0.0.1:$port --only-summary"
    docker run --rm --network host -v "$workdir/features:/features:ro" -e NANN_LOADTEST_FEATURES=/features \
        nann-loadtest:latest --headless -u 2 -r 2 -t 10s --host "127.0.0.1:$port" --only-summary 2>&1 \
        | grep -E "^(Type|grpc|-----| +Aggregated)" | head -8
fi
docker stop --time 30 "$name" >/dev/null
echo "stopped with SIGTERM: exit code $(docker inspect --format '{{.State.ExitCode}}' "$name")"
docker logs "$name" 2>&1 | tail -3
[ "$(docker inspect --format '{{.State.ExitCode}}' "$name")" = 0 ]

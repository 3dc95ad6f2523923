#!/usr/bin/env bash
# Runs the issue-4 scenarios against hubbub and the Node.js `ws` reference,
# one server at a time on 127.0.0.1, and prints a side-by-side table.
# Needs: cargo, node and npm (the reference is installed with `npm ci`).
#
#   bench/compare.sh                 # everything, ~3 minutes
#   SERVERS=ws bench/compare.sh      # only the reference (or SERVERS=hubbub)
#   DURATION=5 bench/compare.sh      # shorter measurement windows
#
# Environment:
#   SERVERS     servers to run, in order (default "hubbub ws floor"); "floor"
#               is no server at all: `hubbub-bench floor` sends the fanout
#               scenarios' messages straight to loopback sockets, the least
#               latency any server could show on this machine
#   SCENARIOS   subset of: fanout-100 fanout-1000 saturate-100 large-60k idle-10000 slow-50
#               (floor runs only the two fanout scenarios), plus two that are not
#               in the default list and run against hubbub only (the ws reference
#               has neither rooms nor hubbub.v1, so it skips them with a note):
#                 saturate-100-v1    saturate-100 with --protocol hubbub.v1
#                 fanout-1000-rooms  1000 clients over 10 rooms, one sender each
#                 flood-100          one client sending as fast as it can, 100
#                                    readers at 1,000 msg/s at most, against
#                                    hubbub's default limits (none lifted)
#                 fanout-1000-wss    fanout-1000 over TLS (wss://)
#                 saturate-100-wss   saturate-100 over TLS (wss://)
#               The -wss ones run hubbub with a certificate made by openssl
#               for the run (P-256, one day, for 127.0.0.1) in target/bench.
#   FLOOR_THREADS  sending threads of the floor run (default: the core count)
#   DURATION    seconds measured per fanout/saturate/large run (default 10)
#   PORT        first WebSocket port; each server start takes the next one
#               (default 18081, so 18081..18092 for the full run)
#   BENCH_ARGS  extra flags for every hubbub-bench run (e.g. "--threads 2")
#   SLOW_ARGS   extra flags for the slow-consumer run (default "--slow-rcvbuf 4096")
#   SLOW_SIZE, SLOW_DURATION
#               message size and seconds of the slow-consumer run (default 64
#               and DURATION). At 64 B the 50 non-readers receive ~6.6 KB/s
#               each, which the server's kernel send buffer (up to 4 MB on
#               loopback) absorbs for minutes, so the server's own slow-consumer
#               handling is only reached with bigger messages or longer runs,
#               e.g. SLOW_SIZE=4096 SLOW_DURATION=20. When they differ from
#               fanout-1000, a twin run with no slow client (slow-0) is added.
#   HUBBUB_ARGS extra flags for hubbub
#   QUIET_MAX   before each run, wait until other work uses at most this much
#               CPU (% of one core, default 25) ...
#   QUIET_WAIT  ... for at most this many seconds (default 120)
#
# Every server is started fresh for each scenario (so RSS figures do not
# carry over) and killed afterwards; a trap kills any left on exit. Results
# are kept as JSON lines in target/bench/.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)

SERVERS=${SERVERS:-"hubbub ws floor"}
SCENARIOS=${SCENARIOS:-"fanout-100 fanout-1000 saturate-100 large-60k idle-10000 slow-50"}
DURATION=${DURATION:-10}
PORT=${PORT:-18081}
BENCH_ARGS=${BENCH_ARGS:-}
SLOW_ARGS=${SLOW_ARGS:---slow-rcvbuf 4096}
SLOW_SIZE=${SLOW_SIZE:-64}
SLOW_DURATION=${SLOW_DURATION:-$DURATION}
HUBBUB_ARGS=${HUBBUB_ARGS:-}
FLOOR_THREADS=${FLOOR_THREADS:-$(nproc)}
QUIET_MAX=${QUIET_MAX:-25}
QUIET_WAIT=${QUIET_WAIT:-120}
# Cargo's target directory (CARGO_TARGET_DIR when set): binaries and results.
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OUT_DIR="$TARGET/bench"
STAMP=$(date -u +%Y%m%d-%H%M%S)
RESULTS="$OUT_DIR/compare-$STAMP.jsonl"
LOGS="$OUT_DIR/compare-$STAMP-logs"
BENCH="$TARGET/release/hubbub-bench"

SERVER_PID=""
cleanup() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        # Give a graceful shutdown 10 s, then force it; `wait` reaps the child.
        ( sleep 10; kill -9 "$SERVER_PID" 2>/dev/null ) &
        local watchdog=$!
        wait "$SERVER_PID" 2>/dev/null || true
        kill "$watchdog" 2>/dev/null || true
        wait "$watchdog" 2>/dev/null || true
    fi
    SERVER_PID=""
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM

log() { printf '>> %s\n' "$*" >&2; }

# Each server start gets its own port (PORT, PORT+1, ...), so a socket of the
# previous run lingering in TIME_WAIT can never make the next bind fail.
PORT_NEXT=$PORT
CUR_PORT=$PORT
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# CPU the whole machine used over one second, in % of one core.
machine_busy_pct() {
    local a b
    a=$(awk '/^cpu / {print $2+$3+$4+$7+$8+$9}' /proc/stat)
    sleep 1
    b=$(awk '/^cpu / {print $2+$3+$4+$7+$8+$9}' /proc/stat)
    echo $(( (b - a) * 100 / $(getconf CLK_TCK) ))
}

# The tool and the server share a 2-core machine: a compile or test run
# elsewhere on it skews every figure. Wait (bounded) for it to calm down;
# each result also records the CPU others used meanwhile (other_cpu_pct).
wait_quiet() {
    local busy waited=0
    while :; do
        busy=$(machine_busy_pct)
        (( busy <= QUIET_MAX )) && return 0
        if (( waited >= QUIET_WAIT )); then
            log "machine still ${busy}% busy after ${QUIET_WAIT}s; measuring anyway (see 'other CPU')"
            return 0
        fi
        (( waited == 0 )) && log "machine ${busy}% busy with other work; waiting up to ${QUIET_WAIT}s"
        waited=$((waited + 1))
    done
}

# Idle needs 10,000 sockets in the tool and 10,000 in the server.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if (( $(ulimit -n) < 10100 )); then
    log "warning: open-files limit $(ulimit -n) is below 10,100; idle-10000 will fail"
fi

mkdir -p "$OUT_DIR" "$LOGS"

# The -wss scenarios: a self-signed certificate for 127.0.0.1 (the tool
# accepts any certificate; it measures the TLS, not the identity).
TLS_CERT="$OUT_DIR/tls-cert.pem"
TLS_KEY="$OUT_DIR/tls-key.pem"
if [[ " $SCENARIOS " == *-wss\ * ]]; then
    log "making a TLS certificate for 127.0.0.1 in $OUT_DIR"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
        -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
        -keyout "$TLS_KEY" -out "$TLS_CERT" 2>/dev/null
fi

log "building release binaries"
build_pkgs=(-p hubbub-bench)
for s in $SERVERS; do [[ $s == hubbub ]] && build_pkgs+=(-p hubbub); done
cargo build --release "${build_pkgs[@]}" >&2

for s in $SERVERS; do
    if [[ $s == ws ]]; then
        if [[ ! -d bench/reference/node_modules/ws ]]; then
            log "installing the reference server's dependencies (npm ci)"
            (cd bench/reference && npm ci --no-audit --no-fund >&2)
        fi
    fi
done

start_server() { # name scenario
    local name=$1 scenario=$2 logf="$LOGS/$1-$2.log" limits
    # The senders of saturate and large-60k send as fast as the server
    # takes it, far over the per-connection rate limit people get by
    # default, and every client comes from 127.0.0.1, far over the default
    # per-address share: both limits are lifted (HUBBUB_ARGS can set them),
    # except for flood-100, which is about what the defaults do.
    limits="--rate-limit-per-sec 0 --max-connections-per-ip 1000000"
    [[ $scenario == flood-100 ]] && limits=""
    [[ $scenario == *-wss ]] && limits+=" --tls-cert $TLS_CERT --tls-key $TLS_KEY"
    CUR_PORT=$PORT_NEXT
    PORT_NEXT=$((PORT_NEXT + 1))
    if port_open "$CUR_PORT"; then
        log "something already listens on 127.0.0.1:$CUR_PORT; set PORT to a free range"
        exit 1
    fi
    case $name in
        hubbub)
            # shellcheck disable=SC2086
            RUST_LOG=${RUST_LOG:-warn} "$TARGET/release/hubbub" --host 127.0.0.1 --http-port 0 \
                --ws-port "$CUR_PORT" --max-connections 20000 $limits $HUBBUB_ARGS >"$logf" 2>&1 &
            ;;
        ws)
            node "$ROOT/bench/reference/server.js" "$CUR_PORT" >"$logf" 2>&1 &
            ;;
        *)
            log "unknown server $name"; exit 1 ;;
    esac
    SERVER_PID=$!
    for _ in $(seq 1 100); do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then break; fi
        if port_open "$CUR_PORT"; then return 0; fi
        sleep 0.1
    done
    log "$name did not start listening on port $CUR_PORT; its log:"
    cat "$logf" >&2
    exit 1
}

run_bench() { # name scenario args...
    local name=$1 scenario=$2 scheme=ws; shift 2
    [[ $scenario == *-wss ]] && scheme=wss
    log "$scenario against $name: hubbub-bench $*"
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        log "$name exited before the run; its log:"
        cat "$LOGS/$name-$scenario.log" >&2
        exit 1
    fi
    # shellcheck disable=SC2086
    timeout 600 "$BENCH" "$@" --url "$scheme://127.0.0.1:$CUR_PORT/" --server-pid "$SERVER_PID" --server-name "$name" \
        --label "$scenario" --json-out "$RESULTS" --no-progress $BENCH_ARGS >&2
}

# The floor: the same fan-out with no server (see `hubbub-bench floor --help`).
run_floor() { # scenario args...
    local scenario=$1; shift
    log "$scenario with no server: hubbub-bench floor $*"
    timeout 600 "$BENCH" floor "$@" -t "$FLOOR_THREADS" --server-name floor --label "$scenario" \
        --json-out "$RESULTS" >&2
}

for name in $SERVERS; do
    for scenario in $SCENARIOS; do
        case $scenario in
            saturate-100-v1 | fanout-1000-rooms | flood-100 | *-wss)
                if [[ $name != hubbub ]]; then
                    [[ $name == floor ]] || log "skipping $scenario against $name: it needs hubbub's rooms, hubbub.v1, limits or TLS"
                    continue
                fi ;;
        esac
        if [[ $name == floor ]]; then
            case $scenario in
                fanout-100) wait_quiet; run_floor "$scenario" -n 100 -r 500 -b 64 -d "$DURATION" ;;
                fanout-1000) wait_quiet; run_floor "$scenario" -n 1000 -r 100 -b 64 -d "$DURATION" ;;
            esac
            continue
        fi
        wait_quiet
        start_server "$name" "$scenario"
        sleep 0.5
        case $scenario in
            fanout-100)
                run_bench "$name" "$scenario" fanout -n 100 -s 10 -r 50 -b 64 -d "$DURATION" ;;
            fanout-1000 | fanout-1000-wss)
                run_bench "$name" "$scenario" fanout -n 1000 -s 5 -r 20 -b 64 -d "$DURATION" ;;
            saturate-100 | saturate-100-wss)
                run_bench "$name" "$scenario" saturate -n 100 -s 10 -b 64 -d "$DURATION" --warmup 2 ;;
            saturate-100-v1)
                # saturate-100 with every client speaking hubbub.v1: the cost of
                # the envelopes and the offset checks (compare with saturate-100).
                run_bench "$name" "$scenario" saturate -n 100 -s 10 -b 64 -d "$DURATION" --warmup 2 \
                    --protocol hubbub.v1 ;;
            fanout-1000-rooms)
                # 1000 clients over /rooms/bench-0..9: 100 readers and one
                # sender per room; each message reaches its room only.
                run_bench "$name" "$scenario" fanout -n 1000 -s 10 -r 20 -b 64 -d "$DURATION" --rooms 10 ;;
            flood-100)
                # One client sends as fast as it can into the room of 100
                # readers, each reading at most 1,000 msg/s; hubbub runs with
                # its default limits, and the 101 connections come from 4
                # addresses so that max_connections_per_ip (100) stays as it is.
                run_bench "$name" "$scenario" flood -n 100 -b 64 -d "$DURATION" --read-rate 1000 \
                    --source-ips 4 ;;
            large-60k)
                # One sender of 61,440-byte messages (under hubbub's default
                # 64 KiB max message) and 4 more readers: MB/s taken in.
                run_bench "$name" "$scenario" saturate -n 5 -s 1 -b 61440 -d "$DURATION" --warmup 2 ;;
            idle-10000)
                run_bench "$name" "$scenario" idle -n 10000 --hold 5 ;;
            slow-50)
                if [[ $SLOW_SIZE != 64 || $SLOW_DURATION != "$DURATION" || $SCENARIOS != *fanout-1000* ]]; then
                    # The same run with no slow client, to judge this one against.
                    run_bench "$name" slow-0 fanout -n 1000 -s 5 -r 20 -b "$SLOW_SIZE" -d "$SLOW_DURATION"
                    cleanup
                    sleep 1
                    wait_quiet
                    start_server "$name" "$scenario"
                    sleep 0.5
                fi
                # shellcheck disable=SC2086
                run_bench "$name" "$scenario" fanout -n 1000 -s 5 -r 20 -b "$SLOW_SIZE" -d "$SLOW_DURATION" \
                    --slow 50 $SLOW_ARGS ;;
            *)
                log "unknown scenario $scenario"; exit 1 ;;
        esac
        cleanup
        sleep 1 # let the sockets of the last run wind down
    done
done

cp "$RESULTS" "$OUT_DIR/compare-latest.jsonl"
{
    echo "hubbub-bench compare, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(free -g | awk '/Mem:/ {print $2}') GiB, Linux $(uname -r)"
    echo "command: bench/compare.sh (SERVERS=\"$SERVERS\" DURATION=$DURATION BENCH_ARGS=\"$BENCH_ARGS\" SLOW_ARGS=\"$SLOW_ARGS\" SLOW_SIZE=$SLOW_SIZE SLOW_DURATION=$SLOW_DURATION)"
    echo
    subject=$(echo "$SERVERS" | awk '{print $1}')
    baseline=$(echo "$SERVERS" | awk '{print $2}')
    if [[ -n "$baseline" ]]; then
        "$BENCH" compare "$RESULTS" --subject "$subject" --baseline "$baseline"
    else
        "$BENCH" compare "$RESULTS"
    fi
} | tee "$OUT_DIR/compare-$STAMP.txt"
log "results: $RESULTS (and compare-latest.jsonl); table: $OUT_DIR/compare-$STAMP.txt"

#!/usr/bin/env bash
# Standalone hubbub against a two-node cluster (two hubbub nodes sharing one
# redis-server), alternated in one run on 127.0.0.1, and a table of both.
# Needs: cargo, redis-server and redis-cli (Redis 7), jq.
#
#   bench/cluster.sh                     # 2 pairs of each scenario, ~3 minutes
#   PAIRS=3 DURATION=5 bench/cluster.sh
#
# For each pair and scenario it runs one standalone node and one cluster
# (in pair 1 standalone first, in pair 2 the cluster first, and so on, so a
# drift in the machine's load does not favour one side). Every run starts
# its servers fresh (the cluster: a new redis-server with nothing in it and
# two nodes) and stops them afterwards; a trap stops any left on exit.
# hubbub runs with --rate-limit-per-sec 0 --max-connections-per-ip 1000000
# as in compare.sh. In the cluster the clients are spread over the two
# nodes (`hubbub-bench --url A,B`: client i on node i mod 2, so the senders
# too).
#
# Scenarios (the same flags as compare.sh):
#   fanout-100    100 clients, 10 send 50 msg/s of 64 B for DURATION s
#   fanout-1000   1000 clients, 5 send 20 msg/s of 64 B
#   saturate-100  100 clients, 10 send as fast as the server takes it
#
# Besides hubbub-bench's figures, each run reports, measured by this script
# over the whole hubbub-bench run (connect, send, drain, close):
#   hubbub CPU s   CPU seconds of the node(s), summed (utime+stime)
#   redis CPU s    CPU seconds of redis-server
#   bench CPU s    CPU seconds of hubbub-bench
#   other CPU s    CPU seconds the rest of the machine used meanwhile (the
#                  machine's total from /proc/stat less the three above,
#                  never below 0): noise, as another build or test run on
#                  the machine skews every figure. A rough sign only: in a
#                  VM /proc/stat can count less than the processes' times
#   cmds/msg       Redis commands per message sent: the growth of the calls
#                  in `INFO commandstats` (every command, those the Lua
#                  scripts run included; the INFO calls of this script not)
#                  divided by the messages hubbub-bench sent (`sent` in its
#                  JSON: every message written by a sender, warm-up and all;
#                  each is one publish)
#   XREAD/msg      the nodes' blocking reads of the events stream per message
#   msgs/batch     messages per publish script call (EVALSHA + EVAL): one
#                  round trip from a node to Redis per batch
# The calls of each command (those the scripts run included) and the
# microseconds Redis spent in it are kept per run in the -redis.tsv file.
#
# Environment:
#   SCENARIOS   subset of "fanout-100 fanout-1000 saturate-100" (default all)
#   PAIRS       alternated standalone/cluster pairs per scenario (default 2)
#   DURATION    seconds measured per run (default 10)
#   PORT        first port; each run takes the next ones (default 18381)
#   REDIS_PORT  first port of the redis-servers (default 16381; never 6379)
#   BENCH_ARGS  extra flags for every hubbub-bench run
#   HUBBUB_ARGS extra flags for every hubbub node
#   QUIET_MAX   before each run, wait until other work uses at most this much
#               CPU (% of one core, default 25) ...
#   QUIET_WAIT  ... for at most this many seconds (default 120)
#
# Results: target/bench/cluster-<stamp>.jsonl (hubbub-bench's JSON lines,
# server "standalone" or "cluster"), cluster-<stamp>-redis.tsv (the figures
# above, one line per run, raw counts), cluster-<stamp>-rows.tsv (both
# joined), cluster-<stamp>.txt (the tables: means over the pairs, every run,
# and hubbub-bench compare for the last pair) and the node and Redis logs in
# cluster-<stamp>-logs/. A node log line at WARN or ERROR is counted in
# "node log warnings".
set -euo pipefail
export LC_ALL=C

cd "$(dirname "$0")/.."
ROOT=$(pwd)

SCENARIOS=${SCENARIOS:-"fanout-100 fanout-1000 saturate-100"}
PAIRS=${PAIRS:-2}
DURATION=${DURATION:-10}
PORT=${PORT:-18381}
REDIS_PORT=${REDIS_PORT:-16381}
BENCH_ARGS=${BENCH_ARGS:-}
HUBBUB_ARGS=${HUBBUB_ARGS:-}
QUIET_MAX=${QUIET_MAX:-25}
QUIET_WAIT=${QUIET_WAIT:-120}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OUT_DIR="$TARGET/bench"
STAMP=$(date -u +%Y%m%d-%H%M%S)
RESULTS="$OUT_DIR/cluster-$STAMP.jsonl"
EXTRA="$OUT_DIR/cluster-$STAMP-redis.tsv"
LOGS="$OUT_DIR/cluster-$STAMP-logs"
BENCH="$TARGET/release/hubbub-bench"
HUBBUB="$TARGET/release/hubbub"

if [[ $REDIS_PORT == 6379 ]]; then
    echo "REDIS_PORT must not be 6379" >&2
    exit 1
fi

log() { printf '>> %s\n' "$*" >&2; }

# Every process this script started, stopped on exit.
PIDS=()
stop_all() {
    local pid watchdog
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        # A graceful shutdown gets 10 s, then it is forced.
        ( sleep 10; kill -9 "$pid" 2>/dev/null ) &
        watchdog=$!
        wait "$pid" 2>/dev/null || true
        kill "$watchdog" 2>/dev/null || true
        wait "$watchdog" 2>/dev/null || true
    done
    PIDS=()
}
trap stop_all EXIT
trap 'stop_all; exit 130' INT TERM

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

PORT_NEXT=$PORT
REDIS_NEXT=$REDIS_PORT
take_port() { # variable-name: the next free port of the WebSocket/HTTP range
    while port_open "$PORT_NEXT"; do PORT_NEXT=$((PORT_NEXT + 1)); done
    printf -v "$1" '%s' "$PORT_NEXT"
    PORT_NEXT=$((PORT_NEXT + 1))
}

# CPU the whole machine used over one second, in % of one core.
machine_busy_pct() {
    local a b
    a=$(awk '/^cpu / {print $2+$3+$4+$7+$8+$9}' /proc/stat)
    sleep 1
    b=$(awk '/^cpu / {print $2+$3+$4+$7+$8+$9}' /proc/stat)
    echo $(( (b - a) * 100 / $(getconf CLK_TCK) ))
}

wait_quiet() {
    local busy waited=0
    while :; do
        busy=$(machine_busy_pct)
        (( busy <= QUIET_MAX )) && return 0
        if (( waited >= QUIET_WAIT )); then
            log "machine still ${busy}% busy after ${QUIET_WAIT}s; measuring anyway (see 'other CPU' in the JSON)"
            return 0
        fi
        (( waited == 0 )) && log "machine ${busy}% busy with other work; waiting up to ${QUIET_WAIT}s"
        waited=$((waited + 1))
    done
}

# utime+stime of the given processes, in clock ticks.
cpu_ticks() {
    local pid total=0 t
    for pid in "$@"; do
        t=$(sed 's/.*) //' "/proc/$pid/stat" | awk '{print $12 + $13}')
        total=$((total + t))
    done
    echo "$total"
}

ticks_to_secs() { awk -v t="$1" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", t / hz}'; }

# Calls per command Redis ran, "name calls" lines (commandstats counts the
# commands scripts run as well as those clients send).
redis_calls() { # port: "name calls usec" lines
    redis-cli -p "$1" INFO commandstats | tr -d '\r' |
        awk -F'[_:=,]' '/^cmdstat_/ {print $2, $4, $6}' | sort
}

# The growth between two redis_calls files: "all evalsha xread breakdown"
# (all: every command but INFO; evalsha: calls of the publish script,
# EVALSHA and EVAL, one per batch; xread: the nodes' blocking reads;
# breakdown: name=calls/usec,... where usec is the time Redis spent in the
# command, for EVALSHA the whole script).
redis_delta() { # before after
    join -a 2 -e 0 -o 0,1.2,1.3,2.2,2.3 "$1" "$2" | awk '
        $1 != "info" { d = $4 - $2; if (d > 0) { all += d; line[$1] = d "/" ($5 - $3) } }
        $1 == "evalsha" || $1 == "eval" { ev += $4 - $2 }
        $1 == "xread" { xr += $4 - $2 }
        END {
            b = ""
            for (c in line) b = b sprintf("%s%s=%s", b == "" ? "" : ",", c, line[c])
            print all + 0, ev + 0, xr + 0, (b == "" ? "-" : b)
        }'
}

# CPU ticks the whole machine used so far.
machine_ticks() { awk '/^cpu / {print $2+$3+$4+$7+$8+$9}' /proc/stat; }

# CPU ticks of this script's waited-for children (hubbub-bench, as `timeout`
# waits for it and the script for `timeout`).
children_ticks() { sed 's/.*) //' "/proc/$$/stat" | awk '{print $14 + $15}'; }

wait_listening() { # pid port name logfile
    for _ in $(seq 1 100); do
        if ! kill -0 "$1" 2>/dev/null; then break; fi
        if port_open "$2"; then return 0; fi
        sleep 0.1
    done
    log "$3 did not start listening on port $2; its log:"
    cat "$4" >&2
    exit 1
}

wait_ready() { # http-port name logfile: /readyz 200 (connected to Redis)
    for _ in $(seq 1 100); do
        if curl -fs -o /dev/null "http://127.0.0.1:$1/readyz"; then return 0; fi
        sleep 0.1
    done
    log "$2 is not ready (/readyz) after 10 s; its log:"
    cat "$3" >&2
    exit 1
}

LIMITS=(--rate-limit-per-sec 0 --max-connections-per-ip 1000000)

NODE_PIDS=()
NODE_LOGS=()
REDIS_PID=""
REDIS_AT=""
URLS=""
start_node() { # name logfile [extra flags...]
    local name=$1 logf=$2 ws http
    shift 2
    take_port ws
    take_port http
    # shellcheck disable=SC2086
    RUST_LOG=${RUST_LOG:-warn} "$HUBBUB" --host 127.0.0.1 --http-port "$http" --ws-port "$ws" \
        --max-connections 20000 "${LIMITS[@]}" "$@" $HUBBUB_ARGS >"$logf" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    NODE_PIDS+=("$pid")
    NODE_LOGS+=("$logf")
    wait_listening "$pid" "$ws" "$name" "$logf"
    wait_ready "$http" "$name" "$logf"
    URLS+="${URLS:+,}ws://127.0.0.1:$ws/"
}

start_setup() { # setup scenario pair
    local setup=$1 tag="$1-$2-$3"
    NODE_PIDS=()
    NODE_LOGS=()
    REDIS_PID=""
    URLS=""
    case $setup in
        standalone)
            start_node standalone "$LOGS/$tag.log" ;;
        cluster)
            while port_open "$REDIS_NEXT" || [[ $REDIS_NEXT == 6379 ]]; do REDIS_NEXT=$((REDIS_NEXT + 1)); done
            REDIS_AT=$REDIS_NEXT
            REDIS_NEXT=$((REDIS_NEXT + 1))
            redis-server --port "$REDIS_AT" --bind 127.0.0.1 --save '' --appendonly no \
                --daemonize no >"$LOGS/$tag-redis.log" 2>&1 &
            REDIS_PID=$!
            PIDS+=("$REDIS_PID")
            wait_listening "$REDIS_PID" "$REDIS_AT" redis-server "$LOGS/$tag-redis.log"
            for n in 1 2; do
                start_node "node$n" "$LOGS/$tag-node$n.log" \
                    --redis-url "redis://127.0.0.1:$REDIS_AT/" --node-id "node$n"
            done ;;
    esac
}

run_bench() { # setup scenario pair args...
    local setup=$1 scenario=$2 pair=$3 before_nodes before_redis=0
    shift 3
    local pid_args=() calls0="$LOGS/calls0" calls1="$LOGS/calls1"
    # The standalone node's CPU and RSS in hubbub-bench's own figures too.
    [[ $setup == standalone ]] && pid_args=(--server-pid "${NODE_PIDS[0]}")
    log "$scenario, $setup (pair $pair): hubbub-bench $* --url $URLS"
    local before_machine before_children
    before_machine=$(machine_ticks)
    before_children=$(children_ticks)
    before_nodes=$(cpu_ticks "${NODE_PIDS[@]}")
    if [[ -n $REDIS_PID ]]; then
        before_redis=$(cpu_ticks "$REDIS_PID")
        redis_calls "$REDIS_AT" >"$calls0"
    fi
    # shellcheck disable=SC2086
    timeout 600 "$BENCH" "$@" --url "$URLS" "${pid_args[@]}" --server-name "$setup" \
        --label "$scenario" --json-out "$RESULTS" --no-progress $BENCH_ARGS >&2
    local nodes_ticks redis_ticks=0 machine tool other nodes_secs redis_secs="-" sent delta="0 0 0 -"
    machine=$(( $(machine_ticks) - before_machine ))
    tool=$(( $(children_ticks) - before_children ))
    nodes_ticks=$(( $(cpu_ticks "${NODE_PIDS[@]}") - before_nodes ))
    nodes_secs=$(ticks_to_secs "$nodes_ticks")
    if [[ -n $REDIS_PID ]]; then
        redis_ticks=$(( $(cpu_ticks "$REDIS_PID") - before_redis ))
        redis_secs=$(ticks_to_secs "$redis_ticks")
        redis_calls "$REDIS_AT" >"$calls1"
        delta=$(redis_delta "$calls0" "$calls1")
    fi
    sent=$(tail -n 1 "$RESULTS" | jq -r '.sent // 0')
    # Log lines above info that the nodes wrote (RUST_LOG=warn: warnings, errors).
    local warnings all evalsha xread breakdown
    warnings=$(cat "${NODE_LOGS[@]}" | grep -c -E 'WARN|ERROR' || true)
    read -r all evalsha xread breakdown <<<"$delta"
    # What the rest of the machine used meanwhile (another build, tests):
    # all CPU but the nodes', Redis's and hubbub-bench's, never below 0 (in
    # a VM /proc/stat can count less than the processes' own times).
    other=$(( machine - nodes_ticks - redis_ticks - tool ))
    other=$(ticks_to_secs $(( other < 0 ? 0 : other )))
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$scenario" "$setup" "$pair" "$sent" \
        "$nodes_secs" "$redis_secs" "$all" "$evalsha" "$xread" "$warnings" \
        "$(ticks_to_secs "$tool")" "$other" "$breakdown" >>"$EXTRA"
}

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
mkdir -p "$OUT_DIR" "$LOGS"
printf 'scenario\tsetup\tpair\tsent\thubbub_cpu_s\tredis_cpu_s\tredis_cmds\tpublish_calls\txread_calls\tlog_warnings\tbench_cpu_s\tother_cpu_s\tcalls_usec\n' >"$EXTRA"

log "building release binaries"
cargo build --release -p hubbub -p hubbub-bench >&2

for pair in $(seq 1 "$PAIRS"); do
    for scenario in $SCENARIOS; do
        if (( pair % 2 == 1 )); then order="standalone cluster"; else order="cluster standalone"; fi
        for setup in $order; do
            wait_quiet
            start_setup "$setup" "$scenario" "$pair"
            sleep 0.5
            case $scenario in
                fanout-100)
                    run_bench "$setup" "$scenario" "$pair" fanout -n 100 -s 10 -r 50 -b 64 -d "$DURATION" ;;
                fanout-1000)
                    run_bench "$setup" "$scenario" "$pair" fanout -n 1000 -s 5 -r 20 -b 64 -d "$DURATION" ;;
                saturate-100)
                    run_bench "$setup" "$scenario" "$pair" saturate -n 100 -s 10 -b 64 -d "$DURATION" --warmup 2 ;;
                *)
                    log "unknown scenario $scenario"; exit 1 ;;
            esac
            stop_all
            sleep 1 # let the sockets of the last run wind down
        done
    done
done

# One line per run, hubbub-bench's figures joined with this script's (TSV):
# scenario setup pair p50 p99 deliveries/s ratio lost sent hubbub-cpu
# redis-cpu cmds/msg xread/msg msgs/batch warnings bench-cpu other-cpu.
ROWS="$OUT_DIR/cluster-$STAMP-rows.tsv"
i=0
while IFS=$'\t' read -r scenario setup pair sent hcpu rcpu cmds calls xread warnings bcpu other _; do
    [[ $scenario == scenario ]] && continue
    i=$((i + 1))
    sed -n "${i}p" "$RESULTS" | jq -r --arg hcpu "$hcpu" --arg rcpu "$rcpu" --arg cmds "$cmds" \
        --arg xread "$xread" --arg calls "$calls" --arg warnings "$warnings" --arg pair "$pair" \
        --arg bcpu "$bcpu" --arg other "$other" '
        def per(x): if (.sent // 0) == 0 or x == "0" then "-" else ((x | tonumber) / .sent) end;
        [.label, .server, $pair, .latency.p50_ms, .latency.p99_ms, .deliveries_per_sec,
         .delivery_ratio, .lost, .sent, $hcpu, $rcpu, per($cmds), per($xread),
         (if $calls == "0" then "-" else .sent / ($calls | tonumber) end), $warnings, $bcpu, $other]
        | map(if . == null then "-" else tostring end) | @tsv'
done <"$EXTRA" >"$ROWS"

runs_table() {
    echo "| scenario | setup | pair | p50 ms | p99 ms | deliveries/s | delivery ratio | lost | sent | hubbub CPU s | Redis CPU s | Redis cmds/msg | XREAD/msg | msgs/batch | node log warnings | bench CPU s | other CPU s |"
    echo "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    awk -F'\t' '
        function n(v, fmt) { return v == "-" ? "-" : sprintf(fmt, v) }
        { printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
            $1, $2, $3, n($4, "%.3f"), n($5, "%.3f"), n($6, "%.0f"), n($7, "%.4f"), $8, $9,
            $10, $11, n($12, "%.2f"), n($13, "%.3f"), n($14, "%.1f"), $15, $16, $17 }' "$ROWS"
}

# Means over the pairs, and the cluster's against standalone's.
mean_table() {
    echo "| scenario | setup | runs | p50 ms | p99 ms | deliveries/s | min delivery ratio | hubbub CPU s | Redis CPU s | Redis cmds/msg | msgs/batch |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    awk -F'\t' '
        function add(k, i) { if ($i != "-") { sum[k, i] += $i; cnt[k, i]++ } }
        function m(k, i, fmt) { return cnt[k, i] ? sprintf(fmt, sum[k, i] / cnt[k, i]) : "-" }
        {
            k = $1 SUBSEP $2
            if (!(k in runs)) { order[++nk] = k }
            runs[k]++
            for (i = 4; i <= 14; i++) add(k, i)
            if (!(k in minr) || ($7 != "-" && $7 < minr[k])) minr[k] = $7
        }
        END {
            for (j = 1; j <= nk; j++) {
                k = order[j]; split(k, p, SUBSEP)
                printf "| %s | %s | %d | %s | %s | %s | %s | %s | %s | %s | %s |\n", p[1], p[2], runs[k],
                    m(k, 4, "%.3f"), m(k, 5, "%.3f"), m(k, 6, "%.0f"), minr[k],
                    m(k, 10, "%.2f"), m(k, 11, "%.2f"), m(k, 12, "%.2f"), m(k, 14, "%.1f")
            }
            print ""
            print "| scenario | cluster p50 - standalone p50 | cluster p99 - standalone p99 | cluster deliveries/s / standalone |"
            print "|---|---:|---:|---:|"
            for (j = 1; j <= nk; j++) {
                k = order[j]; split(k, p, SUBSEP)
                if (p[2] != "cluster") continue
                s = p[1] SUBSEP "standalone"
                if (!(s in runs)) continue
                printf "| %s | %+.3f ms | %+.3f ms | %.2f |\n", p[1],
                    sum[k, 4] / cnt[k, 4] - sum[s, 4] / cnt[s, 4],
                    sum[k, 5] / cnt[k, 5] - sum[s, 5] / cnt[s, 5],
                    (sum[k, 6] / cnt[k, 6]) / (sum[s, 6] / cnt[s, 6])
            }
        }' "$ROWS"
}

{
    echo "hubbub-bench cluster, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(free -g | awk '/Mem:/ {print $2}') GiB, Linux $(uname -r), $(redis-server --version | awk '{print $3}')"
    echo "command: bench/cluster.sh (SCENARIOS=\"$SCENARIOS\" PAIRS=$PAIRS DURATION=$DURATION BENCH_ARGS=\"$BENCH_ARGS\" HUBBUB_ARGS=\"$HUBBUB_ARGS\")"
    echo
    echo "Means over the pairs:"
    echo
    mean_table
    echo
    echo "Every run:"
    echo
    runs_table
    echo
    echo "hubbub-bench compare, the last pair of each scenario:"
    echo
    "$BENCH" compare "$RESULTS" --subject cluster --baseline standalone
} | tee "$OUT_DIR/cluster-$STAMP.txt"
log "results: $RESULTS, $EXTRA; tables: $OUT_DIR/cluster-$STAMP.txt"

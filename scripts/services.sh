#!/usr/bin/env bash
# Local backing services for SyncFlow without Docker:
#   - Apache Kafka 4.x, single-node KRaft (broker+controller), 127.0.0.1:9092
#     (run from Maven Central jars resolved with mvn, not the release tarball)
#   - FerretDB v1 (MongoDB wire protocol, SQLite backend), 127.0.0.1:27017
#   - Redis (Debian's redis-server), 127.0.0.1:6379
#
# Usage:
#   scripts/services.sh up     [kafka|ferretdb|redis ...]   install on first use, start, wait until ready
#   scripts/services.sh down   [--wipe] [kafka|ferretdb|redis ...]
#   scripts/services.sh status [kafka|ferretdb|redis ...]   exit 1 if any is down
#
# Tools/downloads go to .cache/, data, logs and pid files to .data/ (both git-ignored).
# Environment overrides: KAFKA_VERSION, LOG4J_VERSION, FERRETDB_VERSION,
# KAFKA_HEAP_OPTS, KAFKA_GC_OPTS (the broker JVM's collector flags), KAFKA_EXTRA_PROPERTIES
# (lines appended to the broker's server.properties, e.g. "num.io.threads=2"),
# KAFKA_READY_TIMEOUT, FERRETDB_READY_TIMEOUT, REDIS_READY_TIMEOUT, STOP_TIMEOUT.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache"
DATA="$ROOT/.data"
LOGS="$DATA/logs"
PIDS="$DATA/pids"

KAFKA_VERSION="${KAFKA_VERSION:-4.1.2}"
LOG4J_VERSION="${LOG4J_VERSION:-2.24.3}"
# kafka_2.13's pom still declares slf4j-api 1.7.36, which cannot see the
# slf4j2 log4j binding (Kafka would log nothing): pin the 2.x API.
SLF4J_VERSION="2.0.17"
MVN_DEP_PLUGIN_VERSION="3.8.1"
# Fixed cluster id: base64url (no padding) of the 16 bytes "syncflow-local-1".
KAFKA_CLUSTER_ID="c3luY2Zsb3ctbG9jYWwtMQ"
KAFKA_HOST=127.0.0.1
KAFKA_PORT=9092
KAFKA_CONTROLLER_PORT=9093
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms1g -Xmx1g}"
# ZGC, not G1: at 1,000 writes/s G1 stopped this broker for 9-18 ms every 1.2-1.4 s (young
# pauses, mostly scanning old-to-young cards), and those pauses were most of the resolver's
# p99; ZGC's pauses are under a millisecond (docs/BENCHMARKS.md, "The broker's collector").
KAFKA_GC_OPTS="${KAFKA_GC_OPTS:--XX:+UseZGC}"
KAFKA_HOME="$CACHE/kafka-$KAFKA_VERSION"

FERRETDB_VERSION="${FERRETDB_VERSION:-v1.24.2}"
FERRETDB_HOST=127.0.0.1
FERRETDB_PORT=27017
FERRETDB_BIN="$CACHE/bin/ferretdb"

REDIS_HOST=127.0.0.1
REDIS_PORT=6379

KAFKA_READY_TIMEOUT="${KAFKA_READY_TIMEOUT:-120}"
FERRETDB_READY_TIMEOUT="${FERRETDB_READY_TIMEOUT:-30}"
REDIS_READY_TIMEOUT="${REDIS_READY_TIMEOUT:-15}"
STOP_TIMEOUT="${STOP_TIMEOUT:-30}"

ALL_SERVICES=(kafka ferretdb redis)

# ---------------------------------------------------------------- helpers

log() { printf '[services] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

now_ms() { date +%s%3N; }
elapsed() { # elapsed START_MS -> "12.3s"
  local ms=$(($(now_ms) - $1))
  printf '%d.%01ds' $((ms / 1000)) $(((ms % 1000) / 100))
}

port_open() { # port_open HOST PORT
  # shellcheck disable=SC2016  # $0/$1 belong to the inner shell
  timeout 1 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

# alive = exists and is not a zombie (an orphaned daemon stays a zombie until
# PID 1 reaps it, which is not immediate on every machine)
pid_alive() {
  local st
  # /proc/PID/stat: "pid (comm) state ..."; comm may hold spaces, so cut after its ")".
  st="$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
  [[ -n "$st" && "$st" != Z* ]]
}

pid_file() { printf '%s/%s.pid' "$PIDS" "$1"; }

# is_service PID NAME: the process is that service (its command line says so), not another
# process that got the pid after a reboot or a kill -9
is_service() {
  local cmd
  cmd="$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null)" || return 1
  case "$2" in
    kafka) [[ "$cmd" == *kafka.Kafka* ]] ;;
    ferretdb) [[ "$cmd" == *ferretdb* ]] ;;
    redis) [[ "$cmd" == *redis-server* ]] ;;
    *) return 1 ;;
  esac
}

service_pid() { # prints the pid if the service's pid file points to the live service
  local f pid
  f="$(pid_file "$1")"
  [[ -s "$f" ]] || return 1
  pid="$(tr -dc '0-9' <"$f")"
  [[ -n "$pid" ]] && pid_alive "$pid" || return 1
  if ! is_service "$pid" "$1"; then
    log "$1: pid file names pid $pid, which is not $1 (stale); ignoring it"
    rm -f "$f"
    return 1
  fi
  printf '%s' "$pid"
}

show_logs() { # show_logs FILE...
  local f
  for f in "$@"; do
    [[ -f "$f" ]] || continue
    log "---- last 40 lines of $f ----"
    tail -n 40 "$f" >&2 || true
  done
}

# Start a command detached from this script (own session, no stdin, output to
# a log file); its real pid (after exec) is written to PIDFILE.
spawn() { # spawn PIDFILE LOGFILE CMD...
  local pidfile="$1" logfile="$2"
  shift 2
  rm -f "$pidfile"
  # shellcheck disable=SC2016  # $$ and $@ are for the inner shell
  # (Not holding this script's lock, fd 9: a daemon that did would block every later up/down.)
  setsid nohup bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" \
    </dev/null >>"$logfile" 2>&1 9>&- &
  local i
  for i in $(seq 1 50); do
    [[ -s "$pidfile" ]] && return 0
    sleep 0.1
  done
  die "could not start: $* (no pid file after 5s)"
}

# wait_ready NAME TIMEOUT CHECK_FN LOGFILE...
wait_ready() {
  local name="$1" timeout="$2" check="$3"
  shift 3
  local deadline=$((SECONDS + timeout))
  while ((SECONDS < deadline)); do
    if "$check"; then return 0; fi
    if ! service_pid "$name" >/dev/null; then
      log "ERROR: $name exited during startup"
      show_logs "$@"
      exit 1
    fi
    sleep 0.5
  done
  log "ERROR: $name not ready after ${timeout}s"
  show_logs "$@"
  exit 1
}

# refuse to start when something that is not ours holds the port
ensure_port_free() { # ensure_port_free NAME HOST PORT
  if port_open "$2" "$3"; then
    die "$1: $2:$3 is already in use by another process (not started by this script); stop it first"
  fi
}

stop_service() { # stop_service NAME
  local name="$1" pid f i
  f="$(pid_file "$name")"
  if ! pid="$(service_pid "$name")"; then
    rm -f "$f"
    log "$name: not running"
    return 0
  fi
  local t0
  t0="$(now_ms)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
    pid_alive "$pid" || break
    sleep 0.1
  done
  if pid_alive "$pid"; then
    log "$name: still running after ${STOP_TIMEOUT}s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      pid_alive "$pid" || break
      sleep 0.1
    done
    # Not gone even after SIGKILL (stuck in the kernel): keep its pid file, and say so.
    pid_alive "$pid" && die "$name: pid $pid survived SIGKILL; not stopped"
  fi
  rm -f "$f"
  log "$name: stopped (pid $pid) in $(elapsed "$t0")"
}

# ---------------------------------------------------------------- kafka

kafka_install() {
  local marker="$KAFKA_HOME/.installed"
  if [[ -f "$marker" && "$(cat "$marker")" == "$KAFKA_VERSION log4j-$LOG4J_VERSION slf4j-$SLF4J_VERSION" ]] &&
    compgen -G "$KAFKA_HOME/libs/kafka_2.13-$KAFKA_VERSION.jar" >/dev/null; then
    return 0
  fi
  command -v java >/dev/null || die "kafka: java (17+) is required (apt-get install -y openjdk-17-jre-headless)"
  command -v mvn >/dev/null || die "kafka: mvn is required (apt-get install -y maven)"
  log "kafka: resolving org.apache.kafka:kafka_2.13:$KAFKA_VERSION and dependencies with Maven..."
  mkdir -p "$KAFKA_HOME"
  rm -rf "$KAFKA_HOME/libs"
  cat >"$KAFKA_HOME/pom.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- generated by scripts/services.sh: only used to resolve the Kafka broker's jars -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.syncflow</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka-tools</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-api</artifactId>
      <version>$SLF4J_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j2-impl</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
  </dependencies>
  <build>
    <plugins>
      <plugin>
        <groupId>org.apache.maven.plugins</groupId>
        <artifactId>maven-dependency-plugin</artifactId>
        <version>$MVN_DEP_PLUGIN_VERSION</version>
      </plugin>
    </plugins>
  </build>
</project>
EOF
  mvn -q -B -f "$KAFKA_HOME/pom.xml" -Dmaven.repo.local="$CACHE/m2" \
    dependency:copy-dependencies -DincludeScope=runtime \
    -DoutputDirectory="$KAFKA_HOME/libs" >"$KAFKA_HOME/mvn.log" 2>&1 ||
    {
      show_logs "$KAFKA_HOME/mvn.log"
      die "kafka: mvn dependency resolution failed"
    }
  [[ -f "$KAFKA_HOME/libs/kafka_2.13-$KAFKA_VERSION.jar" ]] ||
    die "kafka: kafka_2.13-$KAFKA_VERSION.jar missing after mvn"
  # Other slf4j backends would fight log4j2 for the binding.
  rm -f "$KAFKA_HOME"/libs/slf4j-reload4j-*.jar "$KAFKA_HOME"/libs/slf4j-log4j12-*.jar \
    "$KAFKA_HOME"/libs/logback-classic-*.jar
  printf '%s\n' "$KAFKA_VERSION log4j-$LOG4J_VERSION slf4j-$SLF4J_VERSION" >"$KAFKA_HOME/.installed"
}

kafka_write_config() {
  local dir="$DATA/kafka"
  mkdir -p "$dir/config" "$dir/data" "$LOGS"
  cat >"$dir/config/server.properties" <<EOF
# generated by scripts/services.sh (rewritten at every start)
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$KAFKA_HOST:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$KAFKA_HOST:$KAFKA_PORT,CONTROLLER://$KAFKA_HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$KAFKA_HOST:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data
num.partitions=1
auto.create.topics.enable=false
group.initial.rebalance.delay.ms=0
# single node: every internal topic must have RF=1 / min.isr=1, or
# consumer groups and transactions (exactly-once) never become available
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
default.replication.factor=1
min.insync.replicas=1
${KAFKA_EXTRA_PROPERTIES:-}
EOF
  cat >"$dir/config/log4j2.properties" <<EOF
# generated by scripts/services.sh
status = warn
name = syncflow-kafka
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = \${sys:syncflow.kafka.logfile:-$LOGS/kafka-tools.log}
appender.file.append = true
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.clients.name = org.apache.kafka.clients
logger.clients.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
EOF
}

# kafka_java_cmd HEAP_OPTS LOG4J_FILE MAIN_CLASS ARGS... -> sets the KAFKA_CMD array
kafka_java_cmd() {
  local heap="$1" logfile="$2"
  shift 2
  local -a heap_opts gc_opts
  read -r -a heap_opts <<<"$heap"
  read -r -a gc_opts <<<"$KAFKA_GC_OPTS"
  KAFKA_CMD=(java "${heap_opts[@]}" -server "${gc_opts[@]}"
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
    -Dlog4j2.configurationFile="$DATA/kafka/config/log4j2.properties"
    -Dkafka.logs.dir="$LOGS" -Dsyncflow.kafka.logfile="$logfile"
    -cp "$KAFKA_HOME/libs/*" "$@")
}

# The broker really answers: send an ApiVersions v0 request (correlation id
# 42) and expect a response with that correlation id and error code 0. A
# KRaft broker only processes requests once its startup is complete.
kafka_ready() {
  local resp
  # shellcheck disable=SC2016  # $0/$1 belong to the inner shell
  resp="$(timeout 3 bash -c '
    exec 3<>"/dev/tcp/$0/$1" || exit 1
    printf "\x00\x00\x00\x0c\x00\x12\x00\x00\x00\x00\x00\x2a\x00\x02sf" >&3
    head -c 10 <&3 | od -An -tx1 | tr -d " \n"
  ' "$KAFKA_HOST" "$KAFKA_PORT" 2>/dev/null)" || return 1
  [[ "${resp:8:12}" == "0000002a0000" ]]
}

# first start: also wait for the broker's own "started" log line
kafka_started() {
  kafka_ready && grep -q 'Kafka Server started' "$LOGS/kafka.log" 2>/dev/null
}

kafka_up() {
  local t0 pid
  t0="$(now_ms)"
  kafka_install
  log "kafka: install phase $(elapsed "$t0") (Kafka $KAFKA_VERSION, $KAFKA_HOME)"
  t0="$(now_ms)"
  if pid="$(service_pid kafka)"; then
    wait_ready kafka "$KAFKA_READY_TIMEOUT" kafka_ready "$LOGS/kafka.log" "$LOGS/kafka.out"
    log "kafka: already running (pid $pid) on $KAFKA_HOST:$KAFKA_PORT"
    return 0
  fi
  ensure_port_free kafka "$KAFKA_HOST" "$KAFKA_PORT"
  ensure_port_free kafka-controller "$KAFKA_HOST" "$KAFKA_CONTROLLER_PORT"
  kafka_write_config
  # Keep the previous run's log for post-mortems (log4j truncates kafka.log).
  if [[ -f "$LOGS/kafka.log" ]]; then mv -f "$LOGS/kafka.log" "$LOGS/kafka.log.1"; fi
  # The cluster id is fixed, so formatting existing storage again is a no-op.
  : >"$LOGS/kafka-format.log"
  kafka_java_cmd "-Xmx256m" "$LOGS/kafka-format.log" kafka.tools.StorageTool format \
    --cluster-id "$KAFKA_CLUSTER_ID" -c "$DATA/kafka/config/server.properties" \
    --ignore-formatted
  "${KAFKA_CMD[@]}" >"$LOGS/kafka-format.out" 2>&1 </dev/null || {
    show_logs "$LOGS/kafka-format.log" "$LOGS/kafka-format.out"
    die "kafka: storage format failed"
  }
  : >"$LOGS/kafka.out"
  kafka_java_cmd "$KAFKA_HEAP_OPTS" "$LOGS/kafka.log" kafka.Kafka "$DATA/kafka/config/server.properties"
  spawn "$(pid_file kafka)" "$LOGS/kafka.out" "${KAFKA_CMD[@]}"
  wait_ready kafka "$KAFKA_READY_TIMEOUT" kafka_started "$LOGS/kafka.log" "$LOGS/kafka.out"
  log "kafka: started (pid $(service_pid kafka)) on $KAFKA_HOST:$KAFKA_PORT in $(elapsed "$t0")"
}

# ---------------------------------------------------------------- ferretdb

ferretdb_install() {
  local marker="$CACHE/bin/.ferretdb.version"
  if [[ -x "$FERRETDB_BIN" && -f "$marker" && "$(cat "$marker")" == "$FERRETDB_VERSION" ]]; then
    return 0
  fi
  command -v go >/dev/null || die "ferretdb: go is required to build FerretDB"
  # FerretDB v1.24's go.mod asks for Go 1.24; an older go fails with a less clear message.
  local gov
  gov="$(GOTOOLCHAIN=local go env GOVERSION 2>/dev/null | sed -n 's/^go\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')"
  if [[ -n "$gov" ]] && (( ${gov% *} == 1 && ${gov#* } < 24 )); then
    die "ferretdb: Go 1.24 or later is needed to build FerretDB $FERRETDB_VERSION (found $(GOTOOLCHAIN=local go env GOVERSION))"
  fi
  log "ferretdb: building github.com/FerretDB/FerretDB/cmd/ferretdb@$FERRETDB_VERSION ..."
  mkdir -p "$CACHE/bin" "$CACHE/go" "$CACHE/src"
  # Everything Go-related stays under .cache; -modcacherw keeps the module
  # cache deletable with a plain rm -rf .cache; GOTOOLCHAIN=local never
  # downloads a toolchain.
  local -a goenv=(GOBIN="$CACHE/bin" GOPATH="$CACHE/go" GOMODCACHE="$CACHE/go/mod"
    GOCACHE="$CACHE/go/build" GOFLAGS="-modcacherw -buildvcs=false"
    GOTOOLCHAIN=local CGO_ENABLED=0)
  local glog="$CACHE/go/ferretdb-install.log" src="$CACHE/src/ferretdb-$FERRETDB_VERSION" moddir
  # A plain `go install ...@version` builds a binary that panics at start:
  # build/version/version.txt is generated by FerretDB's release tooling and
  # is not in the module zip. So: fetch the module, copy it, add version.txt,
  # build that copy (with its own go.mod/go.sum, so versions are identical).
  {
    moddir="$(env "${goenv[@]}" go mod download -json \
      "github.com/FerretDB/FerretDB@$FERRETDB_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')" &&
      [[ -n "$moddir" && -d "$moddir" ]] &&
      rm -rf "$src" && cp -r "$moddir" "$src" && chmod -R u+w "$src" &&
      printf '%s\n' "$FERRETDB_VERSION" >"$src/build/version/version.txt" &&
      printf 'source\n' >"$src/build/version/package.txt" &&
      (cd "$src" && env "${goenv[@]}" go build -trimpath -o "$FERRETDB_BIN" ./cmd/ferretdb)
  } >"$glog" 2>&1 || {
    show_logs "$glog"
    die "ferretdb: build failed"
  }
  [[ -x "$FERRETDB_BIN" ]] || die "ferretdb: $FERRETDB_BIN missing after go install"
  printf '%s\n' "$FERRETDB_VERSION" >"$marker"
}

ferretdb_ready() { port_open "$FERRETDB_HOST" "$FERRETDB_PORT"; }

ferretdb_up() {
  local t0 pid
  t0="$(now_ms)"
  ferretdb_install
  log "ferretdb: install phase $(elapsed "$t0") (FerretDB $FERRETDB_VERSION)"
  t0="$(now_ms)"
  if pid="$(service_pid ferretdb)"; then
    wait_ready ferretdb "$FERRETDB_READY_TIMEOUT" ferretdb_ready "$LOGS/ferretdb.log"
    log "ferretdb: already running (pid $pid) on $FERRETDB_HOST:$FERRETDB_PORT"
    return 0
  fi
  ensure_port_free ferretdb "$FERRETDB_HOST" "$FERRETDB_PORT"
  mkdir -p "$DATA/ferretdb" "$DATA/ferretdb-state" "$LOGS"
  if [[ -f "$LOGS/ferretdb.log" ]]; then mv -f "$LOGS/ferretdb.log" "$LOGS/ferretdb.log.1"; fi
  spawn "$(pid_file ferretdb)" "$LOGS/ferretdb.log" \
    "$FERRETDB_BIN" \
    --listen-addr="$FERRETDB_HOST:$FERRETDB_PORT" \
    --handler=sqlite \
    --sqlite-url="file:$DATA/ferretdb/" \
    --state-dir="$DATA/ferretdb-state" \
    --telemetry=disable \
    --debug-addr=- \
    --log-level=info
  wait_ready ferretdb "$FERRETDB_READY_TIMEOUT" ferretdb_ready "$LOGS/ferretdb.log"
  log "ferretdb: started (pid $(service_pid ferretdb)) on $FERRETDB_HOST:$FERRETDB_PORT in $(elapsed "$t0")"
}

# ---------------------------------------------------------------- redis

redis_install() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null && return 0
  [[ "$(id -u)" == 0 ]] || die "redis: redis-server not found; run as root or: sudo apt-get install -y redis-server"
  log "redis: apt-get install redis-server ..."
  mkdir -p "$LOGS"
  {
    apt-get update &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server
  } >"$LOGS/redis-install.log" 2>&1 || {
    show_logs "$LOGS/redis-install.log"
    die "redis: apt-get install failed"
  }
  # Where no policy-rc.d forbids it, the package starts its own system
  # instance on 127.0.0.1:6379; we run our own, so stop that one.
  if port_open "$REDIS_HOST" "$REDIS_PORT"; then
    log "redis: stopping the instance started by the Debian package"
    service redis-server stop >/dev/null 2>&1 || systemctl stop redis-server >/dev/null 2>&1 || true
  fi
  # ... and keep it from starting again at the next boot, where it would hold the port.
  { systemctl disable redis-server || update-rc.d redis-server disable; } >/dev/null 2>&1 || true
}

redis_ready() {
  [[ "$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" == "PONG" ]]
}

redis_up() {
  local t0 pid
  t0="$(now_ms)"
  redis_install
  log "redis: install phase $(elapsed "$t0") ($(redis-server --version | awk '{print $3}'))"
  t0="$(now_ms)"
  if pid="$(service_pid redis)"; then
    wait_ready redis "$REDIS_READY_TIMEOUT" redis_ready "$LOGS/redis.log"
    log "redis: already running (pid $pid) on $REDIS_HOST:$REDIS_PORT"
    return 0
  fi
  ensure_port_free redis "$REDIS_HOST" "$REDIS_PORT"
  mkdir -p "$DATA/redis" "$LOGS" "$PIDS"
  rm -f "$(pid_file redis)"
  # redis daemonizes itself (fork + setsid) and writes its own pid file. It keeps its data in
  # an append-only file: sessions, revocations and the announced marks must survive a restart.
  redis-server --bind "$REDIS_HOST" --port "$REDIS_PORT" --protected-mode yes \
    --daemonize yes --pidfile "$(pid_file redis)" \
    --dir "$DATA/redis" --save "" --appendonly yes --appendfsync everysec \
    --logfile "$LOGS/redis.log" --loglevel notice >/dev/null 2>&1 </dev/null 9>&- || {
    show_logs "$LOGS/redis.log"
    die "redis: redis-server failed to start"
  }
  local i
  for ((i = 0; i < 50; i++)); do
    [[ -s "$(pid_file redis)" ]] && break
    sleep 0.1
  done
  wait_ready redis "$REDIS_READY_TIMEOUT" redis_ready "$LOGS/redis.log"
  log "redis: started (pid $(service_pid redis)) on $REDIS_HOST:$REDIS_PORT in $(elapsed "$t0")"
}

# ---------------------------------------------------------------- status

service_status() { # prints a line; returns 0 if up
  local name="$1" pid ok=1 where
  case "$name" in
    kafka) where="$KAFKA_HOST:$KAFKA_PORT" ;;
    ferretdb) where="$FERRETDB_HOST:$FERRETDB_PORT" ;;
    redis) where="$REDIS_HOST:$REDIS_PORT" ;;
  esac
  if pid="$(service_pid "$name")"; then
    case "$name" in
      kafka) kafka_ready && ok=0 ;;
      ferretdb) ferretdb_ready && ok=0 ;;
      redis) command -v redis-cli >/dev/null && redis_ready && ok=0 ;;
    esac
    if ((ok == 0)); then
      printf '%-9s up    (pid %s, %s)\n' "$name" "$pid" "$where"
    else
      printf '%-9s down  (pid %s alive but %s not answering)\n' "$name" "$pid" "$where"
    fi
  else
    printf '%-9s down\n' "$name"
  fi
  return "$ok"
}

# ---------------------------------------------------------------- main

ensure_gitignore() {
  local gi="$ROOT/.gitignore" line
  touch "$gi"
  for line in /.cache/ /.data/ /target/; do
    grep -qxF "$line" "$gi" || printf '%s\n' "$line" >>"$gi"
  done
}

usage() {
  sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

main() {
  local cmd="${1:-}" wipe=0 arg
  [[ -n "$cmd" ]] || usage
  shift
  local services=()
  for arg in "$@"; do
    case "$arg" in
      --wipe) [[ "$cmd" == down ]] || usage; wipe=1 ;;
      kafka | ferretdb | redis) services+=("$arg") ;;
      *) usage ;;
    esac
  done
  ((${#services[@]})) || services=("${ALL_SERVICES[@]}")

  # One `up` or `down` at a time (scripts/run.sh and scripts/test.sh started together would
  # otherwise both start a broker, and one would be left running without its pid file).
  if [[ "$cmd" != status ]] && command -v flock >/dev/null; then
    mkdir -p "$DATA"
    exec 9>"$DATA/services.lock"
    flock 9
  fi
  case "$cmd" in
    up)
      ensure_gitignore
      mkdir -p "$CACHE" "$LOGS" "$PIDS"
      local t_all s
      t_all="$(now_ms)"
      for s in "${services[@]}"; do "${s}_up"; done
      log "up: ${services[*]} ready in $(elapsed "$t_all")"
      ;;
    down)
      local s i
      if ((wipe)); then
        # SyncFlow's own state, checkpoints and secret live in $DATA too: checked before
        # anything is stopped.
        local sf
        sf="$(tr -dc '0-9' <"$DATA/pids/syncflow.pid" 2>/dev/null || true)"
        if [[ -n "$sf" ]] && tr '\0' ' ' <"/proc/$sf/cmdline" 2>/dev/null | grep -q "syncflow run"; then
          die "--wipe: SyncFlow (pid $sf) still runs on this data; scripts/run.sh stop first"
        fi
      fi
      # stop in reverse order: redis, ferretdb, kafka
      for ((i = ${#services[@]} - 1; i >= 0; i--)); do
        s="${services[$i]}"
        stop_service "$s"
      done
      if ((wipe)); then
        local running=0
        for s in "${ALL_SERVICES[@]}"; do
          service_pid "$s" >/dev/null && running=1
        done
        ((running)) && die "--wipe: other services are still running; run 'down --wipe' without a service list"
        # Everything but the lock this script holds (a waiting up must find the same file).
        find "$DATA" -mindepth 1 -maxdepth 1 ! -name services.lock -exec rm -rf {} +
        log "wiped $DATA"
      fi
      ;;
    status)
      local rc=0 s
      for s in "${services[@]}"; do service_status "$s" || rc=1; done
      exit "$rc"
      ;;
    *) usage ;;
  esac
}

main "$@"

#!/usr/bin/env bash
# SyncFlow's main job on one machine, from nothing:
#   services up (Kafka, FerretDB, Redis) -> build -> topics apply -> `syncflow run` in the
#   background -> a demo write and read through the REST API.
#
#   scripts/run.sh          set up, start, show the demo (SyncFlow keeps running)
#   scripts/run.sh stop     stop SyncFlow (services keep running; scripts/services.sh down stops them)
#
# The JWT secret comes from SYNCFLOW_AUTH_JWT_SECRET, or is generated once into
# .data/jwt-secret (git-ignored). Logs: .data/logs/syncflow.log.
set -euo pipefail
# Everything this writes (the secret, the demo account's password and tokens) is the owner's.
umask 077
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
mkdir -p .data/logs .data/pids
PIDFILE=.data/pids/syncflow.pid
BIN=target/release/syncflow

# The pid in the pid file, if it is a syncflow process still running (not another process
# that got the number after a reboot).
running_pid() {
  local pid
  pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "syncflow run" || return 1
  echo "$pid"
}

# Stops SyncFlow: SIGTERM, up to 30 s for a graceful stop (the API gives requests 10 s, the
# resolver finishes its batch), then SIGKILL. Fails if it is still there.
stop() {
  local pid
  if pid=$(running_pid); then
    kill -TERM "$pid"
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "syncflow (pid $pid) did not stop within 30 s; killing it" >&2
      kill -KILL "$pid"
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && { echo "syncflow (pid $pid) is still running" >&2; return 1; }
    fi
    echo "syncflow stopped"
  fi
  rm -f "$PIDFILE"
}

if [ "${1:-}" = "stop" ]; then stop; exit 0; fi

command -v curl >/dev/null || { echo "run.sh needs curl (apt-get install -y curl)" >&2; exit 1; }
bash scripts/services.sh up
echo "== building syncflow (release)"
cargo build --release -p pipeline --bin syncflow
# The address in effect: SYNCFLOW_API_LISTEN, else the configuration file's (SYNCFLOW_CONFIG),
# else the default.
API=$("$BIN" config api.listen)

if [ -z "${SYNCFLOW_AUTH_JWT_SECRET:-}" ]; then
  if [ ! -s .data/jwt-secret ]; then
    head -c 48 /dev/urandom | base64 | tr -d '\n/+=' > .data/jwt-secret
    chmod 600 .data/jwt-secret
  fi
  SYNCFLOW_AUTH_JWT_SECRET="$(cat .data/jwt-secret)"
fi
export SYNCFLOW_AUTH_JWT_SECRET

echo "== topics"
"$BIN" topics apply

stop
# Another program (or a syncflow this script does not know of) on the API's port would answer
# the checks below in this one's place.
host="${API%:*}"; host="${host#[}"; host="${host%]}"
case "$host" in "" | 0.0.0.0) host=127.0.0.1 ;; "::") host=::1 ;; esac
# shellcheck disable=SC2016  # $0/$1 belong to the inner shell
if timeout 1 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$host" "${API##*:}" 2>/dev/null; then
  echo "something already listens on $API: stop it, or set SYNCFLOW_API_LISTEN (or api.listen in SYNCFLOW_CONFIG's file)" >&2; exit 1
fi
echo "== starting syncflow (all roles), log: .data/logs/syncflow.log"
nohup "$BIN" run >> .data/logs/syncflow.log 2>&1 &
echo $! > "$PIDFILE"
for i in $(seq 1 100); do
  if curl -fsS "http://$API/healthz" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "syncflow exited during start-up:" >&2; tail -n 40 .data/logs/syncflow.log >&2; exit 1
  fi
  [ "$i" -eq 100 ] && { echo "syncflow did not answer on $API" >&2; tail -n 40 .data/logs/syncflow.log >&2; exit 1; }
  sleep 0.2
done
running_pid >/dev/null || { echo "syncflow exited after start-up:" >&2; tail -n 40 .data/logs/syncflow.log >&2; exit 1; }

echo "== demo"
TOKEN=$("$BIN" token --tenant demo --grant 'todos:rw' --sub demo-user)
id="welcome-$(date +%s)"
echo "\$ curl -X PUT http://$API/v1/buckets/todos/docs/$id -d '{\"title\":\"Try SyncFlow\",\"done\":false}'"
curl -sS -X PUT -H "authorization: Bearer $TOKEN" -H 'content-type: application/json' \
  -d '{"title":"Try SyncFlow","done":false}' "http://$API/v1/buckets/todos/docs/$id" -w '  (HTTP %{http_code})\n'
echo "\$ curl http://$API/v1/buckets/todos/docs/$id"
for i in $(seq 1 50); do
  if out=$(curl -fsS -H "authorization: Bearer $TOKEN" "http://$API/v1/buckets/todos/docs/$id" 2>/dev/null); then
    echo "$out  (HTTP 200)"; break
  fi
  [ "$i" -eq 50 ] && { echo "the demo document did not appear" >&2; exit 1; }
  sleep 0.2
done
user="demo$(date +%s)"
# A random password, kept only in a file of the owner's (the account administers its tenant).
password=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
(umask 077 && printf '%s %s\n' "$user" "$password" >>.data/demo-accounts)
echo "\$ curl -X POST http://$API/v1/auth/register -d '{\"username\":\"$user\",...,\"tenant\":\"$user\"}'   (password in .data/demo-accounts)"
curl -sS -X POST -H 'content-type: application/json' \
  -d "{\"username\":\"$user\",\"email\":\"$user@example.com\",\"password\":\"$password\",\"tenant\":\"$user\"}" \
  -f "http://$API/v1/auth/register" -o .data/logs/demo-register.json -w '  (HTTP %{http_code}: a user, its tenant, an access and a refresh token; .data/logs/demo-register.json)\n'
cat <<MSG

SyncFlow is running (pid $(cat "$PIDFILE")) on http://$API.
  token for your own tries:  $BIN token --tenant demo --grant 'todos:rw'   (with SYNCFLOW_AUTH_JWT_SECRET=\$(cat .data/jwt-secret))
  stop:                      scripts/run.sh stop   (services: scripts/services.sh down)
MSG

#!/usr/bin/env bash
# A real single-node Apache Kafka 4.x broker (KRaft: controller + broker in one JVM) for
# tests and the demo, run from the jars on Maven Central with the machine's Java 17.
#
#   deploy/kafka/kafka.sh fetch            # jars into $KAFKA_CACHE (git-ignored), once
#   deploy/kafka/kafka.sh start            # format storage if new, start, wait until it answers
#   deploy/kafka/kafka.sh stop             # SIGTERM, wait for a clean shutdown (then SIGKILL)
#   deploy/kafka/kafka.sh status           # exit 0 when the broker's port answers
#
# Settings (environment):
#   KAFKA_PORT (9092)  KAFKA_CONTROLLER_PORT (KAFKA_PORT+1)  KAFKA_HOST (127.0.0.1)
#   KAFKA_DIR (.data/kafka: log dirs, pid and log file)  KAFKA_CACHE (.cache/kafka)
#   KAFKA_HEAP (512m)  KAFKA_START_TIMEOUT_S (60)  JAVA (java)
#   KAFKA_EXTRA_PROPS  more server.properties lines (e.g. "auto.create.topics.enable=false")
#
# One node of a cluster (tests/faults/cluster.py starts three), when
#   KAFKA_NODE_ID (1)  KAFKA_VOTERS (node.id@host:controller_port, comma-separated; this node alone)
#   KAFKA_CLUSTER_ID   the id every node's storage is formatted with (random for one node)
#   KAFKA_INTERNAL_RF  replication of the internal topics (1)
#
# A secured listener as well (SCRAM-SHA-512 over TLS, like a managed cluster), when
#   KAFKA_SASL_PORT      the SASL_SSL listener's port
#   KAFKA_TLS_KEYSTORE   PEM file: the broker's PKCS#8 private key and certificate chain
#   KAFKA_SCRAM_USERS    "name:password[,name:password...]", added when the storage is formatted
# The PLAINTEXT listener stays for the controller and inter-broker traffic on KAFKA_HOST.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}"
KAFKA_HOST="${KAFKA_HOST:-127.0.0.1}"
KAFKA_DIR="${KAFKA_DIR:-$root/.data/kafka}"
KAFKA_CACHE="${KAFKA_CACHE:-$root/.cache/kafka}"
KAFKA_HEAP="${KAFKA_HEAP:-512m}"
KAFKA_START_TIMEOUT_S="${KAFKA_START_TIMEOUT_S:-60}"
JAVA="${JAVA:-java}"
KAFKA_SASL_PORT="${KAFKA_SASL_PORT:-}"
KAFKA_TLS_KEYSTORE="${KAFKA_TLS_KEYSTORE:-}"
KAFKA_SCRAM_USERS="${KAFKA_SCRAM_USERS:-}"
KAFKA_EXTRA_PROPS="${KAFKA_EXTRA_PROPS:-}"
KAFKA_NODE_ID="${KAFKA_NODE_ID:-1}"
KAFKA_VOTERS="${KAFKA_VOTERS:-$KAFKA_NODE_ID@$KAFKA_HOST:$KAFKA_CONTROLLER_PORT}"
KAFKA_CLUSTER_ID="${KAFKA_CLUSTER_ID:-}"
KAFKA_INTERNAL_RF="${KAFKA_INTERNAL_RF:-1}"
libs="$KAFKA_CACHE/libs"
pidfile="$KAFKA_DIR/broker.pid"

log() { printf 'kafka.sh: %s\n' "$*" >&2; }

fetch() {
  if [ -f "$libs/.complete" ] && cmp -s "$here/pom.xml" "$KAFKA_CACHE/pom.xml"; then
    return 0
  fi
  log "fetching Apache Kafka jars with mvn into $libs"
  rm -rf "$libs" && mkdir -p "$libs"
  mvn -q -B -Dstyle.color=never -f "$here/pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$libs" -DincludeScope=runtime
  cp "$here/pom.xml" "$KAFKA_CACHE/pom.xml"
  touch "$libs/.complete"
}

port_open() { (exec 3<>"/dev/tcp/$KAFKA_HOST/$KAFKA_PORT") 2>/dev/null; }

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

write_config() {
  local listeners="PLAINTEXT://$KAFKA_HOST:$KAFKA_PORT,CONTROLLER://$KAFKA_HOST:$KAFKA_CONTROLLER_PORT"
  local advertised="PLAINTEXT://$KAFKA_HOST:$KAFKA_PORT"
  local protocols="CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
  if [ -n "$KAFKA_SASL_PORT" ]; then
    if [ ! -f "$KAFKA_TLS_KEYSTORE" ]; then log "KAFKA_SASL_PORT needs KAFKA_TLS_KEYSTORE (a PEM file)"; exit 2; fi
    listeners="$listeners,SASL_SSL://$KAFKA_HOST:$KAFKA_SASL_PORT"
    advertised="$advertised,SASL_SSL://$KAFKA_HOST:$KAFKA_SASL_PORT"
    protocols="$protocols,SASL_SSL:SASL_SSL"
  fi
  cat > "$KAFKA_DIR/server.properties" <<PROPS
process.roles=broker,controller
node.id=$KAFKA_NODE_ID
controller.quorum.voters=$KAFKA_VOTERS
listeners=$listeners
advertised.listeners=$advertised
controller.listener.names=CONTROLLER
listener.security.protocol.map=$protocols
inter.broker.listener.name=PLAINTEXT
log.dirs=$KAFKA_DIR/logs
num.partitions=1
offsets.topic.replication.factor=$KAFKA_INTERNAL_RF
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=$KAFKA_INTERNAL_RF
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=$KAFKA_INTERNAL_RF
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.cleaner.backoff.ms=1000
log.segment.delete.delay.ms=1000
PROPS
  if [ -n "$KAFKA_EXTRA_PROPS" ]; then printf '%s\n' "$KAFKA_EXTRA_PROPS" >> "$KAFKA_DIR/server.properties"; fi
  if [ -n "$KAFKA_SASL_PORT" ]; then
    cat >> "$KAFKA_DIR/server.properties" <<PROPS
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.ssl.keystore.type=PEM
listener.name.sasl_ssl.ssl.keystore.location=$KAFKA_TLS_KEYSTORE
listener.name.sasl_ssl.ssl.client.auth=none
PROPS
  fi
}

scram_args() {
  # --add-scram 'SCRAM-SHA-512=[name=alice,password=...]' for each of KAFKA_SCRAM_USERS
  local pair
  local IFS=,
  for pair in $KAFKA_SCRAM_USERS; do
    printf '%s\n' "--add-scram" "SCRAM-SHA-512=[name=${pair%%:*},password=${pair#*:}]"
  done
}

start() {
  fetch
  if running; then log "already running (pid $(cat "$pidfile"))"; return 0; fi
  mkdir -p "$KAFKA_DIR"
  write_config
  if [ ! -f "$KAFKA_DIR/logs/meta.properties" ]; then
    local scram=()
    if [ -n "$KAFKA_SCRAM_USERS" ]; then mapfile -t scram < <(scram_args); fi
    local cluster_id="$KAFKA_CLUSTER_ID"
    if [ -z "$cluster_id" ]; then cluster_id="$("$JAVA" -cp "$libs/*" kafka.tools.StorageTool random-uuid 2>/dev/null)"; fi
    "$JAVA" -cp "$libs/*" kafka.tools.StorageTool format -t "$cluster_id" \
      -c "$KAFKA_DIR/server.properties" "${scram[@]}" >> "$KAFKA_DIR/broker.log" 2>&1
  fi
  nohup "$JAVA" "-Xmx$KAFKA_HEAP" "-Xms$KAFKA_HEAP" -XX:+UseG1GC \
    "-Dlog4j2.configurationFile=$here/log4j2.properties" \
    -cp "$libs/*" kafka.Kafka "$KAFKA_DIR/server.properties" >> "$KAFKA_DIR/broker.log" 2>&1 &
  echo $! > "$pidfile"
  local deadline=$((SECONDS + KAFKA_START_TIMEOUT_S))
  until port_open; do
    if ! running; then log "broker exited during start-up; see $KAFKA_DIR/broker.log"; tail -20 "$KAFKA_DIR/broker.log" >&2; exit 1; fi
    if [ "$SECONDS" -ge "$deadline" ]; then log "broker not answering after ${KAFKA_START_TIMEOUT_S}s"; exit 1; fi
    sleep 0.2
  done
  log "broker up on $KAFKA_HOST:$KAFKA_PORT (pid $(cat "$pidfile"), dir $KAFKA_DIR)"
}

stop() {
  if ! running; then rm -f "$pidfile"; return 0; fi
  local pid; pid="$(cat "$pidfile")"
  kill -TERM "$pid"
  for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; log "stopped"; return 0; }; sleep 0.2; done
  log "broker did not stop in 30s; killing"
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

case "${1:-}" in
  fetch) fetch ;;
  start) start ;;
  stop) stop ;;
  status) port_open ;;
  *) echo "usage: $0 fetch|start|stop|status" >&2; exit 2 ;;
esac

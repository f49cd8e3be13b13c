#!/usr/bin/env bash
# Install the LLM inference service as the systemd user unit "llm-inference".
#
#   ./install-user-service.sh [--models DIR] [--port PORT] [--llama-cpp-dir DIR]
#                             [--config FILE] [--python PYTHON] [--instances N] [--start]
#   ./install-user-service.sh --uninstall
#
# --instances N: N instances (units llm-inference@1..N, on 127.0.0.1 ports PORT+1..PORT+N)
# behind HAProxy on the service's port (unit llm-inference-balancer), as `make cluster` runs
# them (README, "Scaling out"); remembered by later installs; --instances 0: one unit again.
#
# --models, --port and --llama-cpp-dir are written to ~/.config/llm-inference/environment,
# which the service reads at start and on every reload and which wins over the config file
# (default: config/service_config.yaml of this checkout). The Python is this checkout's .venv,
# else a python3 that has requirements.txt installed, else a new .venv (make venv). Without a
# llama-server (--llama-cpp-dir, PATH or the cache) it runs `make engine` first.
# Then: systemctl --user start llm-inference && systemctl --user enable llm-inference
# (with --instances: the same for llm-inference-balancer, which starts its instances).
set -euo pipefail
UNIT=llm-inference
BALANCER=$UNIT-balancer
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONF_HOME=${XDG_CONFIG_HOME:-$HOME/.config}
CONF_DIR=$CONF_HOME/$UNIT
UNIT_DIR=$CONF_HOME/systemd/user
ENV_FILE=$CONF_DIR/environment
STATE=$CONF_DIR/install.env  # what service-status-user.sh needs: checkout, python, config

MODELS='' PORT='' ENGINE='' CONFIG='' PY='' START=0 UNINSTALL=0 INSTANCES_ARG=''
# Set by the eval of `python -m ollama_server.user_service settings` (and `instances`).
host='' port='' models='' models_count='' engine='' stop_timeout=''
haproxy='' balancer_cfg='' run_dir='' instance_ports='' agent_ports=''
die() { echo "install-user-service: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case "$1" in
    --models) MODELS=$(realpath -m "$2"); shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --llama-cpp-dir) ENGINE=$(realpath -m "$2"); shift 2 ;;
    --config) CONFIG=$(realpath -m "$2"); shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --instances) INSTANCES_ARG=$2; shift 2 ;;
    --start) START=1; shift ;;
    --no-start) START=0; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

# systemctl --user, or a note when this session has no user manager (then the unit is only
# written; run the printed commands in a login session).
user_systemctl() {
  if systemctl --user "$@"; then return 0; fi
  echo "install-user-service: 'systemctl --user $*' failed (no systemd user manager in this" \
       "session?)" >&2
  return 1
}

# The instances installed before (0: the one unit), from the last install's state.
INSTALLED=0
if [ -f "$STATE" ]; then
  INSTALLED=$(sed -n 's/^INSTANCES=\([0-9][0-9]*\)$/\1/p' "$STATE")
  INSTALLED=${INSTALLED:-0}
fi
instance_units() {  # llm-inference@FIRST.service .. llm-inference@LAST.service
  local i
  for ((i = $1; i <= $2; i++)); do printf '%s@%d.service\n' "$UNIT" "$i"; done
}
# Stop, disable and remove the balancer and the instances FROM.. (their units, their files).
remove_instances() {
  local from=$1 units
  mapfile -t units < <(instance_units "$from" "$INSTALLED")
  if [ "$from" = 1 ]; then
    units+=("$BALANCER.service")
    rm -f "$CONF_DIR/balancer.cfg" "$CONF_DIR/balancer.cfg.new"
  fi
  [ "${#units[@]}" = 0 ] || user_systemctl disable --now "${units[@]}" 2>/dev/null || true
  for unit in "${units[@]}"; do rm -f "$UNIT_DIR"/*.wants/"$unit"; done
  if [ "$from" = 1 ]; then
    rm -f "$UNIT_DIR/$UNIT@.service" "$UNIT_DIR/$BALANCER.service" "$CONF_DIR"/instance-*.env \
          "$UNIT_DIR"/*.wants/"$UNIT"@*.service
  fi
}
remove_single() {
  user_systemctl disable --now "$UNIT.service" 2>/dev/null || true
  rm -f "$UNIT_DIR/$UNIT.service" "$UNIT_DIR"/*.wants/"$UNIT.service"
}

if [ "$UNINSTALL" = 1 ]; then
  remove_single
  if [ "$INSTALLED" -gt 0 ] || [ -f "$UNIT_DIR/$BALANCER.service" ]; then
    remove_instances 1
    echo "removed the $BALANCER unit and the $UNIT@ instances"
  fi
  rm -f "$STATE"
  user_systemctl daemon-reload || true
  echo "removed the $UNIT unit; your settings stay in $CONF_DIR (delete it to forget them)"
  exit 0
fi
INSTANCES=${INSTANCES_ARG:-$INSTALLED}
[[ "$INSTANCES" =~ ^[0-9]+$ ]] || die "--instances must be a number, not $INSTANCES"

# The Python that runs the service.
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then
    PY=$ROOT/.venv/bin/python
  elif python3 -c 'import flask, gunicorn, yaml, requests, prometheus_client, orjson, greenlet' 2>/dev/null; then
    PY=$(command -v python3)
  else
    make -C "$ROOT" venv
    PY=$ROOT/.venv/bin/python
  fi
fi
PY=$(command -v "$PY") || die "no python at $PY"
case "$PY" in /*) ;; *) PY=$(pwd)/$PY ;; esac
"$PY" -c 'import flask, gunicorn, yaml, requests, prometheus_client, orjson, greenlet' 2>/dev/null ||
  die "$PY lacks the service's packages: run 'pip install -r requirements.txt' or 'make venv'"
[ -n "$PORT" ] && { [[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number, not $PORT"; }
CONFIG=${CONFIG:-$ROOT/config/service_config.yaml}
[ -f "$CONFIG" ] || die "config file $CONFIG does not exist"

# This installation's settings: replace the key's line, or add it.
mkdir -p "$CONF_DIR" "$UNIT_DIR"
if [ ! -f "$ENV_FILE" ]; then
  cat > "$ENV_FILE" <<'TEXT'
# Settings of the llm-inference user service (OLLAMA_SERVER_<KEY>=value, one a line).
# They win over the config file; `systemctl --user reload llm-inference` reads them again.
TEXT
fi
set_env() {
  local tmp
  tmp=$(mktemp "$ENV_FILE.XXXXXX")
  grep -v "^$1=" "$ENV_FILE" > "$tmp" || true
  printf '%s=%s\n' "$1" "$2" >> "$tmp"
  mv "$tmp" "$ENV_FILE"
}
[ -n "$MODELS" ] && set_env OLLAMA_SERVER_MODELS_DIR "$MODELS"
[ -n "$PORT" ] && set_env OLLAMA_SERVER_PORT "$PORT"
[ -n "$ENGINE" ] && set_env OLLAMA_SERVER_LLAMA_CPP_PATH "$ENGINE"

# The settings as the service will read them (from its working directory, the checkout).
settings() { (cd "$ROOT" && OLLAMA_SERVER_ENV_FILE=$ENV_FILE "$PY" -m ollama_server.user_service \
  settings --config "$CONFIG"); }
S=$(settings) || die "the configuration is not valid (see above); fix $CONFIG or $ENV_FILE"
eval "$S"
if [ -z "$engine" ]; then
  [ -z "$ENGINE" ] || die "no llama-server in $ENGINE"
  echo "no llama-server found: building it with 'make engine' (once; about 15 minutes on 2 cores)"
  make -C "$ROOT" engine
  S=$(settings); eval "$S"
fi
if [ "$models_count" = 0 ]; then
  if [ "$models" = "$ROOT/models" ]; then
    make -C "$ROOT" models
  else
    echo "note: no models in $models yet (an Ollama store or a folder of .gguf files)"
  fi
fi

fill() {  # the unit template $1 with this installation's values, to $2
  sed -e "s|@ROOT@|$ROOT|g" -e "s|@PYTHON@|$PY|g" -e "s|@CONFIG@|$CONFIG|g" \
      -e "s|@ENV_FILE@|$ENV_FILE|g" -e "s|@CONF_DIR@|$CONF_DIR|g" \
      -e "s|@STOP_TIMEOUT@|$stop_timeout|g" -e "s|@INSTANCES@|$INSTANCES|g" \
      -e "s|@INSTANCE_UNITS@|${INSTANCE_UNITS:-}|g" -e "s|@HAPROXY@|$haproxy|g" \
      -e "s|@BALANCER_CFG@|$balancer_cfg|g" -e "s|@RUN_DIR@|$run_dir|g" \
      "$ROOT/systemd/$1" > "$2"
}

if [ "$INSTANCES" = 0 ]; then
  [ "$INSTALLED" = 0 ] || { remove_instances 1; echo "removed the $BALANCER unit and the $UNIT@ instances"; }
  fill "$UNIT.service" "$UNIT_DIR/$UNIT.service"
  printf 'ROOT=%q\nPYTHON=%q\nCONFIG=%q\nENV_FILE=%q\n' "$ROOT" "$PY" "$CONFIG" "$ENV_FILE" > "$STATE"
  echo "installed $UNIT_DIR/$UNIT.service (port $port, models $models, engine $engine)"
else
  # The balancer's configuration and each instance's environment file, from the rendered
  # configuration of `python -m ollama_server.cluster render` (cluster.plan's ports).
  S=$(cd "$ROOT" && OLLAMA_SERVER_ENV_FILE=$ENV_FILE "$PY" -m ollama_server.user_service \
    instances --config "$CONFIG" --instances "$INSTANCES" --dir "$CONF_DIR") ||
    die "could not set up $INSTANCES instances (see above)"
  eval "$S"
  [ -f "$UNIT_DIR/$UNIT.service" ] && { remove_single; echo "removed the single $UNIT unit"; }
  [ "$INSTALLED" -gt "$INSTANCES" ] && remove_instances $((INSTANCES + 1))
  INSTANCE_UNITS=$(instance_units 1 "$INSTANCES" | tr '\n' ' ')
  INSTANCE_UNITS=${INSTANCE_UNITS% }
  fill "$UNIT@.service" "$UNIT_DIR/$UNIT@.service"
  fill "$BALANCER.service" "$UNIT_DIR/$BALANCER.service"
  printf 'ROOT=%q\nPYTHON=%q\nCONFIG=%q\nENV_FILE=%q\nINSTANCES=%q\n' "$ROOT" "$PY" "$CONFIG" \
    "$ENV_FILE" "$INSTANCES" > "$STATE"
  echo "installed $UNIT_DIR/$BALANCER.service (HAProxy on $host:$port, configuration" \
       "$balancer_cfg) and $UNIT_DIR/$UNIT@.service for $INSTANCES instances on 127.0.0.1" \
       "ports $instance_ports (agent-checks on $agent_ports; environment files" \
       "$CONF_DIR/instance-N.env), models $models, engine $engine"
fi
echo "settings: $CONFIG, overridden by $ENV_FILE"
if user_systemctl daemon-reload; then
  if [ "$START" = 1 ] && [ "$INSTANCES" = 0 ]; then
    user_systemctl enable --now "$UNIT.service"
    echo "started and enabled"
  elif [ "$START" = 1 ]; then
    # shellcheck disable=SC2086  # the unit names hold no spaces
    user_systemctl enable --now $INSTANCE_UNITS "$BALANCER.service"
    echo "started and enabled"
  elif [ "$INSTANCES" != 0 ]; then
    # A running balancer takes the new configuration without dropping a connection.
    user_systemctl try-reload-or-restart "$BALANCER.service" || true
  fi
fi
echo "next:"
if [ "$INSTANCES" = 0 ]; then
  printf '  %-40s # %s\n' \
    "systemctl --user start $UNIT" "start it now" \
    "systemctl --user enable $UNIT" "start it at login (at boot: sudo loginctl enable-linger $(id -un))" \
    "./service-status-user.sh" "state, health, models, recent errors" \
    "journalctl --user -u $UNIT -f" "follow the logs" \
    "systemctl --user reload $UNIT" "after editing the config or the environment file" \
    "./update-service.sh" "run this checkout's current code, without downtime" \
    "./install-user-service.sh --uninstall" "remove the unit"
else
  printf '  %-58s # %s\n' \
    "systemctl --user start $BALANCER" "start it and its $INSTANCES instances now" \
    "systemctl --user enable $BALANCER $UNIT@{1..$INSTANCES}" "start them at login (at boot: sudo loginctl enable-linger $(id -un))" \
    "./service-status-user.sh" "the balancer and each instance, recent errors" \
    "journalctl --user -u $BALANCER -u '$UNIT@*' -f" "follow the logs" \
    "systemctl --user reload '$UNIT@*'" "after editing the config or the environment file" \
    "./update-service.sh --all" "rolling update to this checkout's code, without downtime" \
    "./install-user-service.sh --instances $INSTANCES" "again after changing the port, host or timeouts" \
    "./install-user-service.sh --uninstall" "remove the units"
fi

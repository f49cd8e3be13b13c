#!/usr/bin/env bash
# Runs `python -m ollama_server.user_service COMMAND` the way the installed llm-inference unit
# runs the service (its checkout, Python, config file and environment file), for
# ./service-status-user.sh (status) and ./update-service.sh (update). With several instances
# installed (./install-user-service.sh --instances N), it passes --instances N.
set -euo pipefail
UNIT=llm-inference
STATE=${XDG_CONFIG_HOME:-$HOME/.config}/$UNIT/install.env
if [ ! -f "$STATE" ]; then
  echo "$UNIT is not installed for $(id -un) (run ./install-user-service.sh)" >&2
  exit 1
fi
INSTANCES=0
# shellcheck source=/dev/null
. "$STATE"
cd "$ROOT"
COMMAND=$1
shift
OLLAMA_SERVER_ENV_FILE=$ENV_FILE exec "$PYTHON" -m ollama_server.user_service "$COMMAND" \
  --config "$CONFIG" --unit "$UNIT" --instances "$INSTANCES" "$@"

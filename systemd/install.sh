#!/usr/bin/env bash
# Install the service as a systemd --user unit: sets the project up (venv, engine, models)
# with make, writes ~/.config/systemd/user/ollama-server.service, enables and starts it.
#   systemd/install.sh [--models DIR] [--port PORT] [--no-start]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODELS="$ROOT/models"
PORT=11435
START=1
while [ $# -gt 0 ]; do
  case "$1" in
    --models) MODELS=$(realpath "$2"); shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --no-start) START=0; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
make -C "$ROOT" setup MODELS="$MODELS"
UNIT_DIR="${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user"
mkdir -p "$UNIT_DIR"
sed -e "s|@ROOT@|$ROOT|g" -e "s|@MODELS@|$MODELS|g" -e "s|@PORT@|$PORT|g" \
  "$ROOT/systemd/ollama-server.service" > "$UNIT_DIR/ollama-server.service"
echo "wrote $UNIT_DIR/ollama-server.service"
if [ "$START" = 1 ]; then
  systemctl --user daemon-reload
  systemctl --user enable --now ollama-server.service
  echo "started: systemctl --user status ollama-server; journalctl --user -u ollama-server -f"
  echo "to keep it running after logout: loginctl enable-linger $USER"
fi

#!/usr/bin/env bash
# Zero-downtime update of the llm-inference user service to this checkout's current code:
# a new gunicorn master starts the current code on the same socket and takes over; the old one
# finishes its requests in flight and exits. Connections are never refused; if the new code
# does not start, the old service keeps running. Waits until the handover is complete.
#   ./update-service.sh [--timeout SECONDS]
exec "$(dirname "${BASH_SOURCE[0]}")/systemd/user-service-tool.sh" update "$@"

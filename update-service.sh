#!/usr/bin/env bash
# Zero-downtime update of the llm-inference user service to this checkout's current code:
# a new gunicorn master starts the current code on the same socket and takes over; the old one
# finishes its requests in flight and exits. Connections are never refused; if the new code
# does not start, the old service keeps running. Waits until the handover is complete.
#   ./update-service.sh [--timeout SECONDS]
# With several instances behind the balancer (./install-user-service.sh --instances N), a
# rolling update of them all, one at a time: drained (the balancer sends it nothing new), its
# requests finished, updated as above, back in the balancer once ready; then the next one.
#   ./update-service.sh --all
exec "$(dirname "${BASH_SOURCE[0]}")/systemd/user-service-tool.sh" update "$@"

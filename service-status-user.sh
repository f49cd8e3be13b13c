#!/usr/bin/env bash
# The llm-inference user service at a glance: unit state, pid, uptime, port, health, loaded
# models and their devices, and recent errors from the journal. With several instances
# installed (./install-user-service.sh --instances N): the balancer, then one line per instance.
#   ./service-status-user.sh
exec "$(dirname "${BASH_SOURCE[0]}")/systemd/user-service-tool.sh" status "$@"

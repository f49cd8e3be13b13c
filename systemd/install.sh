#!/usr/bin/env bash
# Kept for older instructions: installs and starts the "llm-inference" user unit.
# See ../install-user-service.sh --help.
exec "$(dirname "$0")/../install-user-service.sh" --start "$@"

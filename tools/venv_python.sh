#!/bin/sh
# Bazel's Python interpreter: the project's .venv (made by `make test`), found from this
# script's real location so no machine path is written into the build files.
here=$(dirname "$(readlink -f "$0")")
exec "$here/../.venv/bin/python" "$@"

#!/usr/bin/env bash
# Entrypoint of the Strata image: `docker run IMAGE train cfg.yaml` runs `strata train cfg.yaml`.
# When the first argument is a program on PATH (ray, python, bash, ...), it runs as is, so Ray
# head/worker containers and SLURM (pyxis) tasks use the same image. exec keeps signals direct.
set -euo pipefail

if [ "$#" -eq 0 ]; then
  set -- --help
fi
if [ "${1#-}" = "$1" ] && type -P -- "$1" >/dev/null 2>&1; then
  exec "$@"
fi
exec strata "$@"

# Sourced by the other scripts: runs the idempotent setup and loads its environment
# (LIBTORCH pointing into the torch venv) so cargo builds tch against it.
SHOAL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1090
source "$("$SHOAL_ROOT/scripts/setup" | tail -n 1)"
export SHOAL_ROOT

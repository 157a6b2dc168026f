# Sourced by the benchmarks: installs a tool they drive when it is absent (Debian packages, as
# scripts/services.sh installs the servers). `need wrk` → wrk, from package wrk.
need() { # command [package]
  command -v "$1" >/dev/null 2>&1 && return 0
  local package=${2:-$1}
  echo "bench: installing $package (for $1)" >&2
  local sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$package" >/dev/null 2>&1 \
    || { DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq >/dev/null 2>&1 \
         && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$package" >/dev/null 2>&1; } \
    || { echo "bench: could not install $package; $1 is required" >&2; exit 2; }
}

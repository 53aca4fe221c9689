#!/usr/bin/env bash
# Build the gateway's container image on a machine that reaches no container registry:
#
#   deploy/build-image.sh [TAG]          (TAG defaults to gateway:<version in pyproject.toml>)
#
# With podman, or else docker (a running daemon with BuildKit), whichever is installed
# (ENGINE=podman|docker chooses). Where python:3.11-slim and PyPI are reachable from the
# build, `docker build -f deploy/Dockerfile .` is all it takes; this script is for where they
# are not:
# - The base image is made from Debian packages: mmdebstrap (minbase, python3, python3-venv,
#   ca-certificates) from the Debian mirror this machine's apt already uses (read from
#   /etc/apt/sources.list*, see deploy/debian_mirrors.py; DEBIAN_MIRROR overrides), imported as
#   localhost/debian-base:bookworm and passed as BASE_IMAGE. Made once and reused;
#   REFRESH_BASE=1 makes it again (security updates).
# - The wheels are built on this machine from the pinned set (constraints.txt) with a Python
#   3.11 (PYTHON, default python3: it must match Debian 12's), and replace the Dockerfile's
#   `wheelhouse` stage (--build-context). The build itself runs with no network at all.
#   Debian 12's python is 3.11.2, so redis needs async-timeout there, which a newer host
#   Python leaves out: it is named here (pinned in constraints.txt).
# - podman: unless CONTAINERS_CONF is set, a containers.conf of its own, with no default
#   ulimits (podman's RLIMIT_NOFILE of 1048576 is more than some sandboxes may set) and runc
#   as the runtime when installed (crun refuses cgroups in hybrid mode). The image is built in
#   docker format: the OCI format has no HEALTHCHECK.
# Cached in ${XDG_CACHE_HOME:-~/.cache}/gateway-image (GATEWAY_IMAGE_CACHE): the wheels, per
# constraints.txt, and the wheel-building virtualenv; the engine caches the layers, so a
# rebuild after a change to gateway/ only reinstalls the gateway itself.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
version=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$root/pyproject.toml")
tag=${1:-gateway:$version}
base=localhost/debian-base:bookworm
suite=bookworm
cache=${GATEWAY_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gateway-image}
started=$SECONDS

say() { printf 'build-image: [%3d s] %s\n' "$((SECONDS - started))" "$*" >&2; }
die() { say "$*"; exit 1; }

engine=${ENGINE:-}
if [ -z "$engine" ]; then
  if command -v podman >/dev/null 2>&1; then
    engine=podman
  elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    engine=docker
  else
    die "neither podman nor a running docker is installed (apt install podman runc)"
  fi
fi
"$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || die "$python is not a Python 3.11: the wheels must fit the image's (Debian 12's 3.11); set PYTHON"
mkdir -p "$cache"

if [ -n "${CONTAINERS_CONF:-}" ] && [ ! -f "$CONTAINERS_CONF" ]; then
  die "CONTAINERS_CONF names $CONTAINERS_CONF, which does not exist (unset it to get ours)"
fi
if [ "$engine" = podman ] && [ -z "${CONTAINERS_CONF:-}" ]; then
  {
    printf '[containers]\ndefault_ulimits = []\n'
    if command -v runc >/dev/null 2>&1; then printf '[engine]\nruntime = "runc"\n'; fi
  } > "$cache/containers.conf"
  export CONTAINERS_CONF=$cache/containers.conf
fi
if [ "$engine" = docker ]; then
  export DOCKER_BUILDKIT=1  # --build-context
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

# 1. The base image, from Debian packages.
if [ -n "${REFRESH_BASE:-}" ] || ! "$engine" image inspect "$base" >/dev/null 2>&1; then
  command -v mmdebstrap >/dev/null 2>&1 || die "mmdebstrap is not installed (apt install mmdebstrap)"
  say "making $base with mmdebstrap"
  "$python" "$root/deploy/debian_mirrors.py" "$suite" > "$stage/sources.list"
  # No manuals, translations or docs (but the copyright files) in a server image.
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    "$suite" "$stage/base.tar" - < "$stage/sources.list"
  "$engine" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' "$stage/base.tar" "$base" >/dev/null
  rm -f "$stage/base.tar"
fi

# 2. The wheels, built here: the dependencies once per constraints.txt, the gateway each time.
mkdir -p "$stage/context"
cp "$root/pyproject.toml" "$root/README.md" "$root/constraints.txt" "$stage/context/"
tar -C "$root" --exclude=__pycache__ -cf - gateway | tar -C "$stage/context" -xf -
venv=$cache/venv
[ -x "$venv/bin/pip" ] || "$python" -m venv "$venv"
key=$(cat "$root/constraints.txt" "$root/pyproject.toml" | sha256sum | cut -c1-16)
deps=$cache/wheels-$key
if [ ! -e "$deps/.complete" ]; then
  say "building the dependency wheels (constraints.txt)"
  rm -rf "$deps"
  "$venv/bin/pip" wheel --quiet --disable-pip-version-check --wheel-dir "$deps" \
    -c "$root/constraints.txt" "$stage/context" async-timeout
  rm -f "$deps"/gateway-*.whl
  touch "$deps/.complete"
  find "$cache" -maxdepth 1 -name 'wheels-*' ! -name "wheels-$key" -exec rm -rf {} +
fi
mkdir -p "$stage/wheelhouse/wheels/deps" "$stage/wheelhouse/wheels/app"
cp "$deps"/*.whl "$stage/wheelhouse/wheels/deps/"
"$venv/bin/pip" wheel --quiet --disable-pip-version-check --no-deps \
  --wheel-dir "$stage/wheelhouse/wheels/app" "$stage/context"

# 3. The image, with no network: everything it installs is in the wheelhouse.
args=(build --network none -f "$root/deploy/Dockerfile" -t "$tag"
      --build-arg "BASE_IMAGE=$base" --build-context "wheelhouse=$stage/wheelhouse")
if [ "$engine" = podman ]; then
  args+=(--format docker --pull=never)
fi
say "building $tag with $engine"
previous=$("$engine" image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
"$engine" "${args[@]}" "$stage/context"
# The image this tag named before is of no more use: drop it, unless a container still uses it
# (each rebuild would otherwise leave one behind).
current=$("$engine" image inspect --format '{{.Id}}' "$tag")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
  "$engine" rmi "$previous" >/dev/null 2>&1 || true
fi
say "built $tag with $engine"

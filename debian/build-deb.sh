#!/bin/sh
# Build the .deb from a copy of the tree, so that neither the checkout nor its
# parent directory gets build files (dpkg-buildpackage writes ../*.deb).
#   debian/build-deb.sh [OUTDIR]      (default OUTDIR: /tmp/agentctl-deb)
# Prints the path of the .deb on the last line.  Needs, as root:
#   apt-get install debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools
# and lintian to check the result (LINTIAN=0 skips it).
set -eu
src=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-/tmp/agentctl-deb}
work=$(mktemp -d /tmp/agentctl-debbuild.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/agentctl-swarm" "$out"
# Only what git would see (tracked or untracked but not ignored): no egg-info,
# no __pycache__, no debian/ build leftovers.
(cd "$src" && git ls-files -z --cached --others --exclude-standard) \
    | (cd "$src" && xargs -0 cp --parents -t "$work/agentctl-swarm" 2>/dev/null || true)
# Debian's interpreters only: a pyenv or venv python3.11 earlier on PATH would
# be picked up by pybuild and lack the build modules.
(cd "$work/agentctl-swarm" && env PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    dpkg-buildpackage -us -uc -b >"$work/build.log" 2>&1) \
    || { tail -n 40 "$work/build.log" >&2; exit 1; }
deb=$(ls "$work"/agentctl-swarm_*_all.deb)
cp "$deb" "$out/"
if [ "${LINTIAN:-1}" != 0 ] && command -v lintian >/dev/null; then
    lintian --fail-on error "$out/$(basename "$deb")" >&2
fi
echo "$out/$(basename "$deb")"

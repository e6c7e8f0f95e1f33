#!/bin/bash
# The README's two commands from a fresh clone on a machine "without" nginx and docker-compose.
#
#   flock /work/heavy.lock bash bench/fresh_machine.sh [REPO] [WORK]
#
# REPO (default: this checkout) is cloned into WORK/fresh-clone (default WORK: /tmp), a
# python3.11 venv is made at WORK/fresh-venv, and PATH is only that venv's bin plus
# WORK/fresh-bin (links to git, bash and basic coreutils from /usr/bin). It re-runs itself under
# `unshare --mount` (a private mount namespace; root): there nginx and docker-compose are covered by a
# non-executable empty file, so neither PATH nor tests/system_tools.py's /usr/sbin lookup finds
# them, while the rest of the machine keeps them. Prints both exit codes and times; the pytest
# summary line has the pass/skip counts. Issue 22, part 9.
set -u
REPO=${1:-$(cd "$(dirname "$0")/.." && pwd)}
WORK=${2:-/tmp}
if [ -z "${FRESH_MACHINE_NS:-}" ]; then  # always in a private mount namespace of its own
  exec env FRESH_MACHINE_NS=1 unshare --mount --propagation private bash "$0" "$REPO" "$WORK"
fi
mount --make-rprivate / || exit 2  # the bind mounts below must not reach the rest of the machine
rm -rf "$WORK/fresh-clone" "$WORK/fresh-venv" "$WORK/fresh-bin"
git clone -q "$REPO" "$WORK/fresh-clone" || exit 1
python3.11 -m venv "$WORK/fresh-venv" || exit 1
mkdir -p "$WORK/fresh-bin"
for t in git bash sh env ls cat cp mv rm mkdir rmdir ln chmod touch head tail grep sed awk sort \
  uniq wc tr cut date sleep uname id which dirname basename readlink realpath mktemp find xargs \
  tee test true false kill ps openssl tar gzip nproc stat du df printf echo expr seq timeout \
  getent hostname whoami; do
  p=$(PATH=/usr/bin:/bin command -v "$t") && ln -sf "$p" "$WORK/fresh-bin/$t"
done
touch "$WORK/not-installed" && chmod 644 "$WORK/not-installed"
for tool in /usr/sbin/nginx /usr/bin/docker-compose; do
  [ -e "$tool" ] && mount --bind "$WORK/not-installed" "$tool"
done
export PATH="$WORK/fresh-venv/bin:$WORK/fresh-bin"
unset PYTHONPATH VIRTUAL_ENV CI
cd "$WORK/fresh-clone" || exit 1
echo "commit $(git log --oneline -1 | cut -c1-60)"
echo "which nginx docker-compose: $(which nginx docker-compose 2>&1 | tr '\n' ' ') (nothing = hidden)"
python -c "import shutil; print('shutil.which:', shutil.which('nginx'), shutil.which('nginx', path='/usr/sbin'), shutil.which('docker-compose'))"
/usr/bin/uptime
start=$(date +%s)
pip install -e ".[dev]" && python -m simulations.demo
rc1=$?
mid=$(date +%s)
echo "FIRST COMMAND rc=$rc1 seconds=$((mid - start))"
/usr/bin/uptime
python -m pytest
rc2=$?
end=$(date +%s)
echo "SECOND COMMAND rc=$rc2 seconds=$((end - mid))"
/usr/bin/uptime

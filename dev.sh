#!/usr/bin/env bash
# The two commands of the quick start, for developers and CI alike:
#
#   ./dev.sh demo            run the README's example daemon end to end
#   ./dev.sh test [ARGS]     run the whole test suite (ARGS go to pytest)
#   ./dev.sh bench [ARGS]    run the throughput benchmark
#
# Installs what is missing first: Debian's rabbitmq-server and postgresql
# (as root; the tests start private servers of both on loopback) and a
# virtualenv in .venv with gocept.amqprun and its test dependencies.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv

need_root_for() {
    if [ "$(id -u)" != 0 ]; then
        echo "dev.sh: $1 is missing; install it as root (apt-get install $1)" >&2
        exit 1
    fi
}

install_system_packages() {
    local missing=()
    [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
    if [ ${#missing[@]} -gt 0 ]; then
        need_root_for "${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
}

install_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp="$VENV/.installed"
    if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
        "$VENV/bin/python" -m pip install -q --upgrade pip
        "$VENV/bin/python" -m pip install -q -e '.[test,security,testing]'
        touch "$stamp"
    fi
}

command=${1:-}
shift || true
case "$command" in
    demo)
        install_system_packages
        install_venv
        PATH="$PWD/$VENV/bin:$PATH" exec "$VENV/bin/python" examples/quickstart/demo.py "$@"
        ;;
    test)
        install_system_packages
        install_venv
        PATH="$PWD/$VENV/bin:$PATH" exec "$VENV/bin/python" -m pytest "$@"
        ;;
    bench)
        install_system_packages
        install_venv
        PATH="$PWD/$VENV/bin:$PATH" exec "$VENV/bin/python" bench/throughput.py "$@"
        ;;
    *)
        sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac

#!/usr/bin/env bash
# The two commands of the quick start, for developers and CI alike:
#
#   ./dev.sh demo            run the README's example daemon end to end
#   ./dev.sh test [ARGS]     run the whole test suite (ARGS go to pytest)
#   ./dev.sh docs            build the documentation (docs/_build/html)
#   ./dev.sh bench [ARGS]    run the throughput benchmark
#
# Installs what is missing first: Debian's rabbitmq-server and postgresql
# (as root; the tests start private servers of both on loopback) and a
# virtualenv in .venv with gocept.amqprun and its test dependencies.
#
# Coverage: `./dev.sh test` without ARGS (what .ci/run calls) measures line
# and branch coverage of the whole run, subprocesses included (.coveragerc),
# prints what is not covered and fails below its fail_under. With ARGS it
# runs pytest alone, for quick targeted runs; COVERAGE=1 (or CI=true)
# measures those too (report only: a part proves no threshold), COVERAGE=0
# never measures. The exit status is pytest's when tests fail, else the
# coverage report's (2 below the threshold). Without ARGS the docs are
# built afterwards too (as `./dev.sh docs`); a docs build that fails fails
# the run.
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

# install_venv [EXTRAS]: .venv with gocept.amqprun[EXTRAS], editable.
install_venv() {
    local extras=${1:-test,security,testing}
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp="$VENV/.installed-${extras//,/-}"
    if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
        "$VENV/bin/python" -m pip install -q --upgrade pip
        "$VENV/bin/python" -m pip install -q -e ".[$extras]"
        touch "$stamp"
    fi
}

run_tests() {
    local measure=${COVERAGE:-}
    if [ -z "$measure" ]; then
        if [ $# -eq 0 ] || [ "${CI:-}" = true ]; then measure=1; else measure=0; fi
    fi
    if [ "$measure" != 1 ]; then
        exec "$VENV/bin/python" -m pytest "$@"
    fi
    local coverage=("$VENV/bin/python" -m coverage)
    local fail_under=()
    [ $# -eq 0 ] || fail_under=(--fail-under=0)  # a part proves nothing
    "${coverage[@]}" erase
    local status=0
    "${coverage[@]}" run -m pytest "$@" || status=$?
    local report_status=0
    if "${coverage[@]}" combine -q; then
        "${coverage[@]}" report "${fail_under[@]}" || report_status=$?
    else
        report_status=1
    fi
    if [ "$status" = 0 ]; then
        status=$report_status
    fi
    return "$status"
}

build_docs() {
    install_venv docs
    rm -rf docs/_build
    "$VENV/bin/sphinx-build" -W -q -b html docs docs/_build/html
    "$VENV/bin/sphinx-build" -W -q -b doctest docs docs/_build/doctest
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
        export PATH="$PWD/$VENV/bin:$PATH"
        if [ $# -gt 0 ]; then
            run_tests "$@"
            exit 0
        fi
        # The whole suite: the tests, then the docs (warnings are errors,
        # their examples run as doctests), so that the docs stay true.
        status=0
        run_tests || status=$?
        if ! build_docs; then
            echo "dev.sh: the documentation does not build" >&2
            [ "$status" != 0 ] || status=1
        fi
        exit "$status"
        ;;
    docs)
        "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
            || install_system_packages
        build_docs
        echo "dev.sh: the documentation is in docs/_build/html/index.html"
        ;;
    bench)
        install_system_packages
        install_venv
        PATH="$PWD/$VENV/bin:$PATH" exec "$VENV/bin/python" bench/throughput.py "$@"
        ;;
    *)
        sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac

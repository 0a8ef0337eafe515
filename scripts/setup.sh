#!/usr/bin/env bash
# Set up everything nbiafs needs on a Debian or Ubuntu machine, idempotently:
# system packages (FUSE, DCMTK, dcm2niix) through apt when root, otherwise the
# exact command to run; a virtual environment in .venv with the package and its
# test dependencies. Works without a terminal.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(fuse3 libfuse3-3 attr dcmtk dcm2niix openssl file bsdutils)
PYTHON=${PYTHON:-python3}

missing=()
# Debian's own python3 needs python3-venv for `python3 -m venv`.
if ! "$PYTHON" -c "import ensurepip, venv" >/dev/null 2>&1; then
    missing+=(python3-venv)
fi
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "setup: installing ${missing[*]} with apt-get" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "setup: missing system packages; run:" >&2
        echo "    sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
fi

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[codecs,test,idc]'

# `nbiafs` and `mount.fuse.nbiafs` on the PATH of every new shell: links to this checkout's
# .venv in /usr/local/bin as root, in ~/.local/bin otherwise (on the PATH of Debian's and
# Ubuntu's login shells once it exists). NBIAFS_NO_LINK=1 skips this.
if [ "${NBIAFS_NO_LINK:-0}" != 1 ]; then
    if [ "$(id -u)" -eq 0 ]; then bindir=/usr/local/bin; else bindir="$HOME/.local/bin"; fi
    mkdir -p "$bindir"
    for cmd in nbiafs mount.fuse.nbiafs; do
        target="$PWD/.venv/bin/$cmd"
        link="$bindir/$cmd"
        if [ -L "$link" ] || [ ! -e "$link" ]; then
            if [ "$(readlink "$link" 2>/dev/null)" != "$target" ]; then
                ln -sfn "$target" "$link"
                echo "setup: $link -> $target" >&2
            fi
        else
            echo "setup: $link exists and is not a link; left alone (use $target)" >&2
        fi
    done
    case ":$PATH:" in
        *":$bindir:"*) ;;
        *) echo "setup: $bindir is not on this shell's PATH; a new login shell has it" \
                "(or: export PATH=\"$bindir:\$PATH\")" >&2 ;;
    esac
fi

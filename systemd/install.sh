#!/usr/bin/env bash
# Install or upgrade the edgesaga agent as a systemd service. See docs/deploy.md.
set -euo pipefail

readonly SERVICE_USER=edgesaga
readonly GPIO_GROUP=gpio
readonly PREFIX=/opt/edgesaga        # fixed: the unit's ExecStart points into it
readonly UNIT=edgesaga.service

usage() {
    cat <<EOF
Usage: sudo $0 [--no-start] [--root DIR] [--python PYTHON] [--no-venv]

Install or upgrade edgesaga from the source tree this script lives in. Safe to run again:
it never overwrites /etc/edgesaga/agent.yaml and restarts the service only if it is running.

  1. creates the system group '$GPIO_GROUP' (if missing) and the system user '$SERVICE_USER'
     (no login, home /var/lib/edgesaga), and adds the user to '$GPIO_GROUP'
  2. creates the virtualenv $PREFIX/venv (with system site-packages, so that
     Raspberry Pi OS's python3-lgpio is found) and pip-installs edgesaga into it
  3. installs /etc/sysusers.d/edgesaga.conf and /etc/tmpfiles.d/edgesaga.conf (the user, and
     the config's group, as systemd keeps them), /etc/edgesaga/agent.yaml from
     systemd/agent.yaml if it does not exist (mode 0640, group $SERVICE_USER), and
     /etc/edgesaga/workflows
  4. installs /etc/systemd/system/$UNIT, runs 'systemctl daemon-reload' and
     'systemctl enable --now edgesaga' (or 'restart' when it is already running)

Options:
  --no-start       enable the service but do not start or restart it
  --root DIR       install into the image whose root is DIR instead of / (image builds, tests):
                   nothing is started; the user and group are created in DIR's /etc when
                   systemd-sysusers is there (else at the image's first boot). The venv runs the
                   image's own Python at the build host's path: build from the same OS release
                   and CPU architecture as the device, with python3 installed in DIR
  --python PYTHON  interpreter that creates the virtualenv (default: python3)
  --no-venv        leave $PREFIX/venv alone (you install edgesaga into it yourself)
  -h, --help       show this help
EOF
}

log() { printf 'install.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

start=1
root=""
python=python3
venv=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --no-start) start=0 ;;
        --root)
            [[ $# -ge 2 && -n "$2" ]] || die "--root needs a directory, e.g. --root /tmp/image."
            root="$2"
            shift
            ;;
        --root=*) root="${1#--root=}" ;;
        --python)
            [[ $# -ge 2 && -n "$2" ]] || die "--python needs an interpreter, e.g. --python python3.11."
            python="$2"
            shift
            ;;
        --python=*) python="${1#--python=}" ;;
        --no-venv) venv=0 ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            log "error: unknown argument '$1'; see --help."
            exit 2
            ;;
    esac
    shift
done

src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ -f "$src/pyproject.toml" && -f "$src/systemd/$UNIT" ]] ||
    die "$src does not look like the edgesaga source tree (no pyproject.toml or systemd/$UNIT)."

if [[ -n "$root" ]]; then
    mkdir -p "$root"
    root="$(cd "$root" && pwd)"
    [[ "$root" != / ]] || root=""
fi
if [[ -z "$root" && "$(id -u)" -ne 0 ]]; then
    die "run this as root (sudo $0), or pass --root DIR to install into a directory."
fi

# --- 1. user and groups (live system only) ------------------------------------------------------
if [[ -z "$root" ]]; then
    if ! getent group "$GPIO_GROUP" >/dev/null; then
        log "creating system group $GPIO_GROUP"
        groupadd --system "$GPIO_GROUP"
    fi
    if ! getent passwd "$SERVICE_USER" >/dev/null; then
        log "creating system user $SERVICE_USER"
        nologin="$(command -v nologin || echo /usr/sbin/nologin)"
        if getent group "$SERVICE_USER" >/dev/null; then
            group_args=(--gid "$SERVICE_USER")
        else
            group_args=(--user-group)
        fi
        useradd --system "${group_args[@]}" --home-dir /var/lib/edgesaga --no-create-home \
            --shell "$nologin" --comment "edgesaga agent" "$SERVICE_USER"
    fi
    if ! id -nG "$SERVICE_USER" | tr ' ' '\n' | grep -qx "$GPIO_GROUP"; then
        log "adding $SERVICE_USER to group $GPIO_GROUP"
        usermod --append --groups "$GPIO_GROUP" "$SERVICE_USER"
    fi
else
    log "--root: user $SERVICE_USER and group $GPIO_GROUP are made in the image (step 3)"
fi

# --- 2. virtualenv ----------------------------------------------------------------------------------
# Under --root the venv is built in DIR$PREFIX/venv and then moved in place by rewriting the paths
# in it (script shebangs, pyvenv.cfg, activate): on the device it lives at $PREFIX/venv. Its
# bin/python links to the interpreter by its absolute path, which must be the image's own.
if [[ "$venv" -eq 1 ]]; then
    staged="$root$PREFIX/venv"
    if [[ -n "$root" ]]; then
        base="$("$python" -c 'import os, sys; print(os.path.realpath(sys.executable))')" ||
            die "cannot run $python; pass --python with the interpreter the venv should use."
        [[ -n "$base" && -x "$root$base" ]] ||
            die "--root: $root has no ${base:-python}, the interpreter the venv would run on the device; install python3 in the image (same OS release and architecture as this host), or pass --no-venv and run install.sh on the device."
    fi
    if [[ ! -x "$staged/bin/python" ]]; then
        log "creating virtualenv $staged"
        mkdir -p "$root$PREFIX"
        "$python" -m venv --system-site-packages "$staged"
    fi
    log "installing edgesaga from $src"
    "$staged/bin/python" -m pip install --quiet --disable-pip-version-check \
        --upgrade "$src"
    if [[ -n "$root" ]]; then
        log "pointing the venv's scripts at $PREFIX/venv (their path on the device)"
        pattern="$(printf '%s' "$staged" | sed 's/[][\\.*^$|&]/\\&/g')"
        replacement="$(printf '%s' "$PREFIX/venv" | sed 's/[\\|&]/\\&/g')"
        while IFS= read -r -d '' file; do
            sed -i "s|$pattern|$replacement|g" "$file"
        done < <(grep -rlIZFs -- "$staged" "$staged/pyvenv.cfg" "$staged/bin" || true)
    fi
fi
install -d -m 0755 "$root$PREFIX/doc"
install -m 0644 "$src/docs/deploy.md" "$root$PREFIX/doc/deploy.md"

# --- 3. configuration --------------------------------------------------------------------------------
# The user and group as systemd-sysusers declares them, and the config's owner and mode as
# systemd-tmpfiles keeps them at every boot: an image gets both even when nothing ran in it yet.
install -d -m 0755 "$root/etc/sysusers.d" "$root/etc/tmpfiles.d"
install -m 0644 "$src/systemd/sysusers.conf" "$root/etc/sysusers.d/edgesaga.conf"
install -m 0644 "$src/systemd/tmpfiles.conf" "$root/etc/tmpfiles.d/edgesaga.conf"
group=""
if [[ -z "$root" ]]; then
    group="$SERVICE_USER"
elif command -v systemd-sysusers >/dev/null; then
    log "creating user $SERVICE_USER and group $GPIO_GROUP in $root/etc"
    systemd-sysusers --root="$root" "$root/etc/sysusers.d/edgesaga.conf"
    group="$(awk -F: -v name="$SERVICE_USER" '$1 == name { print $3 }' "$root/etc/group")"
else
    log "systemd-sysusers not found: the image creates user $SERVICE_USER at its first boot"
fi

install -d -m 0755 "$root/etc/edgesaga" "$root/etc/edgesaga/workflows"
config="$root/etc/edgesaga/agent.yaml"
if [[ -e "$config" ]]; then
    log "keeping existing $config"
else
    log "installing example configuration $config (edit device_id and mqtt before starting)"
    install -m 0640 "$src/systemd/agent.yaml" "$config"
fi
if [[ -n "$group" ]]; then
    # Readable by the service, which runs as $SERVICE_USER; not by other users.
    chgrp "$group" "$config"
fi

# --- 4. systemd unit ------------------------------------------------------------------------------------
install -d -m 0755 "$root/etc/systemd/system"
install -m 0644 "$src/systemd/$UNIT" "$root/etc/systemd/system/$UNIT"

if ! command -v systemctl >/dev/null; then
    log "systemctl not found: enable the service yourself (systemctl enable --now edgesaga)"
elif [[ -n "$root" ]]; then
    systemctl --root="$root" --quiet enable "$UNIT"
elif [[ ! -d /run/systemd/system ]]; then
    # In a chroot or container image build: enabling is just symlinks, starting is for later.
    log "systemd is not running: enabling $UNIT for the next boot without starting it"
    systemctl --quiet enable "$UNIT"
else
    systemctl daemon-reload
    if [[ "$start" -eq 0 ]]; then
        systemctl --quiet enable "$UNIT"
        log "enabled $UNIT; start it with: systemctl start edgesaga"
    elif systemctl --quiet is-active "$UNIT"; then
        # An upgrade: the running agent stops gracefully and resumes its workflows on start.
        log "restarting $UNIT"
        systemctl --quiet enable "$UNIT"
        systemctl restart "$UNIT"
    else
        log "enabling and starting $UNIT"
        systemctl --quiet enable --now "$UNIT"
    fi
fi

log "done. Status: systemctl status edgesaga   Logs: journalctl -u edgesaga -f"

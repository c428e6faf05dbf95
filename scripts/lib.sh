# shellcheck shell=bash
# Sourced by the scripts: what more than one of them needs.

say() { printf '\n==> %s\n' "$*" >&2; }

# ensure_debian_packages PACKAGE...
#
# Installs the Debian packages of the list that are missing, with apt-get,
# quietly (the log is shown only when it fails). Returns 0 when all of them
# are installed afterwards; returns 1, saying which are missing, when it
# cannot install them (not root, or no dpkg/apt-get); exits 1 when apt-get
# fails.
#
# Installing a package must not start the services it brings (sshd, say): a
# policy-rc.d that refuses every service start is put in place while apt-get
# runs (only if there is none already; removed again afterwards), and
# RUNLEVEL=1 is set for scripts that look at that instead.
ensure_debian_packages() {
  local packages=("$@")
  if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    echo "no dpkg/apt-get: make sure ${packages[*]} are installed" >&2
    return 1
  fi
  local missing=() pkg
  for pkg in "${packages[@]}"; do
    if [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" != "install ok installed" ]; then
      missing+=("$pkg")
    fi
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    echo "all installed: ${packages[*]}" >&2
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "not root: cannot install ${missing[*]}" >&2
    return 1
  fi
  echo "installing ${missing[*]}" >&2
  local policy=/usr/sbin/policy-rc.d added="" log rc=0 previous_trap
  previous_trap="$(trap -p EXIT)"
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    added="$policy"
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  log="$(mktemp)"
  {
    apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
  } >"$log" 2>&1 || rc=$?
  if [ -n "$added" ]; then
    rm -f "$added"
    # Whatever the caller had set up for EXIT is in force again.
    eval "${previous_trap:-trap - EXIT}"
  fi
  if [ "$rc" != 0 ]; then
    cat "$log" >&2
    rm -f "$log"
    echo "could not install ${missing[*]} (see above)" >&2
    exit 1
  fi
  rm -f "$log"
}

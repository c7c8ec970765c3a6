#!/usr/bin/env bash
# Checks a built wsrelay .deb (`cargo deb`): its files and conffile, the binary and the
# shipped configuration from an extracted copy, and, when run as root on a machine
# without wsrelay installed, a real install: `systemd-analyze verify` on the installed
# units, `wsrelay --check-config` on the installed configuration, the service left
# disabled, then removal (the configuration kept) and purge (gone).
# Usage: packaging/check-deb.sh target/debian/wsrelay_<version>_<arch>.deb
set -euo pipefail
deb=${1:?usage: check-deb.sh PACKAGE.deb}
fail() { echo "check-deb: $*" >&2; exit 1; }

files=$(dpkg-deb --contents "$deb" | awk '{print $6}' | sed 's#^\./#/#')
for expected in /usr/bin/wsrelay /etc/wsrelay/wsrelay.toml \
    /usr/lib/systemd/system/wsrelay.service /usr/lib/systemd/system/wsrelay@.service \
    /usr/share/doc/wsrelay/README.md /usr/share/doc/wsrelay/examples/nginx/wsrelay.conf \
    /usr/share/wsrelay/wsrelay.js; do
    grep -qx "$expected" <<<"$files" || fail "$expected is not in the package"
done
conffiles=$(dpkg-deb --ctrl-tarfile "$deb" | tar -xOf - ./conffiles)
grep -qx /etc/wsrelay/wsrelay.toml <<<"$conffiles" || fail "the configuration is not a conffile"
for script in postinst prerm postrm; do
    body=$(dpkg-deb --ctrl-tarfile "$deb" | tar -xOf - "./$script" 2>/dev/null || true)
    if grep -Eq 'systemctl (--[a-z-]+ )*(start|restart)|deb-systemd-invoke (start|restart)' <<<"$body"; then
        fail "$script starts or restarts the service"
    fi
done

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
dpkg-deb --extract "$deb" "$root"
"$root/usr/bin/wsrelay" --version
if readelf --section-headers "$root/usr/bin/wsrelay" | grep -Eq '\.debug_(info|line) '; then
    fail "the binary carries debug information (build with cargo deb --strip)"
fi
"$root/usr/bin/wsrelay" --check-config --config "$root/etc/wsrelay/wsrelay.toml" |
    grep -q '^configuration ok' || fail "the shipped configuration does not check"

if [ "$(id -u)" != 0 ]; then
    echo "check-deb: not root: the package was checked extracted, not installed"
    exit 0
fi
if dpkg-query -W -f '${Status}' wsrelay 2>/dev/null | grep -q 'installed'; then
    fail "a wsrelay package is installed already; not touching it"
fi
dpkg -i "$deb" >/dev/null
systemd-analyze verify /usr/lib/systemd/system/wsrelay.service
cp /usr/lib/systemd/system/wsrelay@.service "$root/wsrelay@8080.service"
systemd-analyze verify "$root/wsrelay@8080.service"
wsrelay --check-config --config /etc/wsrelay/wsrelay.toml | grep -q '^configuration ok' ||
    fail "the installed configuration does not check"
state=$(systemctl is-enabled wsrelay.service 2>/dev/null || true)
[ "$state" != enabled ] || fail "the package enabled the service"
dpkg -r wsrelay >/dev/null
[ ! -e /usr/bin/wsrelay ] || fail "removal left the binary"
[ -e /etc/wsrelay/wsrelay.toml ] || fail "removal took the configuration (a conffile stays until purge)"
dpkg -P wsrelay >/dev/null
[ ! -e /etc/wsrelay/wsrelay.toml ] || fail "purge left the configuration"
echo "check-deb: installed, verified, removed and purged"

#!/bin/sh
# xenrun's guest installer (the debootstrap plugin, xenrun/plugins/debootstrap.py),
# installed in dom0 as /usr/local/lib/xenrun/debootstrap-guest and run by a planned
# command. It builds a Debian system in a scratch folder with debootstrap, makes it
# a Xen guest (fstab by UUID, network, root's SSH key, a boot config that pygrub and
# pvgrub2 both read, a console on hvc0), and only then writes it to the guest's
# disk as one ext4 filesystem (mkfs.ext4 -d). The filesystem is labelled "xenrun-partial"
# while it is written and "root" once complete, so `check` (the plan's guard) tells
# an installed disk from a half-written one, and `install` never overwrites a disk
# that holds anything else.
#
#   debootstrap-guest check   --disk PATH --uuid UUID
#   debootstrap-guest install --disk PATH --uuid UUID --suite S --mirror URL --include P1,P2
#                             --hostname H --address dhcp|A.B.C.D/N [--gateway G] [--dns "D1 D2"]
#                             --ssh-key KEY [--no-check-gpg yes]
set -eu
PARTIAL=xenrun-partial
LABEL=root

die() { echo "debootstrap-guest: $*" >&2; exit 1; }
say() { echo "debootstrap-guest: $*"; }

[ $# -ge 1 ] || die "usage: debootstrap-guest check|install --disk PATH --uuid UUID ..."
cmd=$1
shift
disk='' uuid='' suite='' mirror='' include='' hostname='' address=dhcp gateway='' dns='' key='' nogpg=''
while [ $# -gt 0 ]; do
    [ $# -ge 2 ] || die "$1 needs a value"
    case $1 in
        --disk) disk=$2 ;;
        --uuid) uuid=$2 ;;
        --suite) suite=$2 ;;
        --mirror) mirror=$2 ;;
        --include) include=$2 ;;
        --hostname) hostname=$2 ;;
        --address) address=$2 ;;
        --gateway) gateway=$2 ;;
        --dns) dns=$2 ;;
        --ssh-key) key=$2 ;;
        --no-check-gpg) nogpg=$2 ;;
        *) die "unknown option $1" ;;
    esac
    shift 2
done
[ -n "$disk" ] && [ -n "$uuid" ] || die "--disk and --uuid are needed"

installed() {  # the system this script put on the disk, complete
    [ "$(blkid -p -o value -s UUID -- "$disk" 2>/dev/null)" = "$uuid" ] &&
        [ "$(blkid -p -o value -s LABEL -- "$disk" 2>/dev/null)" = "$LABEL" ]
}

case $cmd in
    check) installed; exit ;;
    install) ;;
    *) die "unknown command $cmd (check, install)" ;;
esac

if installed; then
    say "$disk already holds the installed system"
    exit 0
fi
for tool in debootstrap mkfs.ext4 e2label blkid; do
    command -v "$tool" >/dev/null 2>&1 ||
        die "$tool is not installed in dom0 (Debian: apt-get install debootstrap e2fsprogs; Arch: pacman -S debootstrap)"
done
[ -e "$disk" ] || die "$disk does not exist"
if blkid -p -- "$disk" >/dev/null 2>&1 && [ "$(blkid -p -o value -s LABEL -- "$disk" 2>/dev/null)" != "$PARTIAL" ]; then
    found=$(blkid -p -o value -s TYPE -- "$disk" 2>/dev/null || true)
    die "$disk already holds ${found:-a partition table or a filesystem}: xenrun installs only onto an empty disk" \
        "(to use the disk as it is, remove the guest's install table from domains.toml)"
fi
[ -n "$suite" ] && [ -n "$mirror" ] && [ -n "$hostname" ] && [ -n "$key" ] ||
    die "--suite, --mirror, --hostname and --ssh-key are needed"

work=$(mktemp -d /var/tmp/xenrun-install.XXXXXX)
# --one-file-system: a /proc or /sys debootstrap left mounted after a kill is never descended into
trap 'rm -rf --one-file-system -- "$work"' EXIT
root=$work/root

say "debootstrap $suite from $mirror into $root (some minutes)"
debootstrap --variant=minbase --include="$include" ${nogpg:+--no-check-gpg} "$suite" "$root" "$mirror"

say "configuring $hostname"
printf '%s\n' "$hostname" > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' "$hostname" > "$root/etc/hosts"
printf '# written by xenrun (debootstrap)\nUUID=%s\t/\text4\terrors=remount-ro\t0\t1\n' "$uuid" > "$root/etc/fstab"
{
    printf '# written by xenrun (debootstrap): the guest NIC on xenbr0\nsource /etc/network/interfaces.d/*\n\n'
    printf 'auto lo\niface lo inet loopback\n\nauto eth0\n'
    if [ "$address" = dhcp ]; then
        printf 'iface eth0 inet dhcp\n'
    else
        printf 'iface eth0 inet static\n    address %s\n' "$address"
        [ -z "$gateway" ] || printf '    gateway %s\n' "$gateway"
    fi
} > "$root/etc/network/interfaces"
if [ -n "$dns" ]; then
    for server in $dns; do printf 'nameserver %s\n' "$server"; done > "$root/etc/resolv.conf"
fi
printf 'deb %s %s main\n' "$mirror" "$suite" > "$root/etc/apt/sources.list"
mkdir -p "$root/root/.ssh"
chmod 700 "$root/root/.ssh"
printf '%s\n' "$key" > "$root/root/.ssh/authorized_keys"
chmod 600 "$root/root/.ssh/authorized_keys"

# the newest kernel debootstrap installed; GRUB's syntax, which pygrub and pvgrub2 both read
kernel=$(cd "$root/boot" && ls vmlinuz-* 2>/dev/null | sort -V | tail -n 1)
[ -n "$kernel" ] || die "debootstrap installed no kernel in /boot (is linux-image-amd64 in --include?)"
version=${kernel#vmlinuz-}
[ -e "$root/boot/initrd.img-$version" ] || die "no /boot/initrd.img-$version (is initramfs-tools installed?)"
mkdir -p "$root/boot/grub"
cat > "$root/boot/grub/grub.cfg" <<EOF
# written by xenrun (debootstrap): read by pygrub and pvgrub2
set default=0
set timeout=1
menuentry 'Debian GNU/Linux, $version' {
    search --no-floppy --fs-uuid --set=root $uuid
    linux /boot/$kernel root=UUID=$uuid ro console=hvc0 net.ifnames=0
    initrd /boot/initrd.img-$version
}
EOF
chroot "$root" apt-get clean

say "writing the system to $disk"
mkfs.ext4 -q -F -U "$uuid" -L "$PARTIAL" -d "$root" "$disk"
e2label "$disk" "$LABEL"
say "installed Debian $suite on $disk"

#!/bin/sh
# net-switch: make a new network configuration live without cutting the host off.
# Installed by xenrun (step S11) at /usr/local/lib/xenrun/net-switch; replaced on
# every run. The same script serves every network plugin (netctl, ifupdown,
# networkd, third-party ones): the plugin says which files and which commands, the
# script does the switching, the checking and the way back.
#
#   net-switch run DIR BRIDGE UPLINK ADDRESS/PREFIX|dhcp GATEWAY|- TIMEOUT
#   net-switch confirm DIR
#   net-switch check BRIDGE UPLINK ADDRESS/PREFIX|dhcp
#
# DIR is written by xenrun before "run": "files" (one line per file, tab-separated:
# PATH NEW|- NEWMODE OLD|- OLDMODE OLDUID OLDGID; "-" means absent) and the commands
# stop.N, start.N, undo.N, restart.N (N = 1, 2, ...), each a list of words separated
# by NUL bytes, run without a shell.
#
# run: records the addresses and routes of now; runs stop.* (the old files still in
# place); puts each NEW in place; runs start.*; waits up to TIMEOUT seconds for
# UPLINK to be a port of BRIDGE, BRIDGE up with the address, the default route
# through BRIDGE (when there was one) and the gateway answering ping. Then it leaves
# a watchdog behind and exits 0: unless "confirm DIR" comes within TIMEOUT seconds
# (xenrun runs it over its connection, which proves the host still reachable), the
# watchdog reverts. Reverting: undo.*, each OLD put back, restart.*, and the old
# addresses and default route put back by hand if they are still missing.
# check: exits 0 when the bridge is already as expected; changes nothing.

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
# a dropped SSH session must not stop the switch half way
trap '' HUP PIPE
TAB=$(printf '\t')

say() {
    printf 'net-switch: %s\n' "$*" >&2
    command -v logger >/dev/null 2>&1 && logger -t xenrun-net-switch -- "$*" 2>/dev/null
    return 0
}

usage() {
    say "$1"
    say "usage: $0 run DIR BRIDGE UPLINK ADDRESS/PREFIX|dhcp GATEWAY|- TIMEOUT"
    say "       $0 confirm DIR"
    say "       $0 check BRIDGE UPLINK ADDRESS/PREFIX|dhcp"
    exit 2
}

is_ifname() {
    case $1 in ''|-*|*[!A-Za-z0-9_.-]*) return 1 ;; esac
    [ "${#1}" -le 15 ]
}

is_address() {
    [ "$1" = dhcp ] && return 0
    case $1 in ''|*[!0-9./]*) return 1 ;; */*) return 0 ;; esac
    return 1
}

is_ipv4() {
    case $1 in ''|*[!0-9.]*) return 1 ;; esac
    return 0
}

is_dir() {
    case $1 in /*) [ -d "$1" ] && [ -f "$1/files" ] ;; *) return 1 ;; esac
}

# the global IPv4 addresses of an interface, one per line
addresses() {
    ip -o -4 addr show dev "$1" scope global 2>/dev/null | awk '{ print $4 }'
}

# the gateway of the default route through an interface ("-" without one)
default_gateway() {
    ip -4 route show default 2>/dev/null | awk -v dev="$1" '{
        d = ""; g = "-"
        for (i = 1; i < NF; i++) { if ($i == "dev") d = $(i + 1); if ($i == "via") g = $(i + 1) }
        if (d == dev) { print g; exit }
    }'
}

is_port() {
    ip -o link show dev "$2" 2>/dev/null | grep -Fq " master $1 "
}

is_up() {
    line=$(ip -o link show dev "$1" 2>/dev/null) || return 1
    flags=${line#*<}
    flags=${flags%%>*}
    case ",$flags," in *,UP,*) ;; *) return 1 ;; esac
    case $line in *" state UP "*|*" state UNKNOWN "*) return 0 ;; esac
    return 1
}

has_address() {
    have=$(addresses "$1")
    if [ "$2" = dhcp ]; then
        [ -n "$have" ]
    else
        printf '%s\n' "$have" | grep -Fxq -- "$2"
    fi
}

# the first thing wrong with the bridge, or nothing: the rules of xenrun's bridge_status
bridge_problem() {
    is_port "$1" "$2" || { echo "$2 is not a port of $1"; return; }
    is_up "$1" || { echo "$1 is not up"; return; }
    has_address "$1" "$3" || echo "$1 has not the address $3 (has: $(addresses "$1" | tr '\n' ' '))"
}

# everything the switch waits for; prints the first failure
switch_problem() {
    problem=$(bridge_problem "$bridge" "$uplink" "$want")
    [ -n "$problem" ] && { echo "$problem"; return; }
    route_gw=$(default_gateway "$bridge")
    if [ -z "$route_gw" ]; then
        [ "$need_route" = yes ] && echo "the default route does not go through $bridge"
        return
    fi
    target=$gateway
    [ "$target" = - ] && target=$route_gw
    [ "$target" = - ] && return
    command -v ping >/dev/null 2>&1 || { echo "cannot check gateway $target: ping is not installed"; return; }
    ping -c 1 -W 1 -I "$bridge" "$target" >/dev/null 2>&1 || echo "gateway $target does not answer ping through $bridge"
}

# run the commands DIR/KIND.1, KIND.2 ... (words separated by NUL, no shell), each
# bounded by the timeout; stops at the first failure when $2 is "strict"
run_commands() {
    n=1
    while [ -f "$dir/$1.$n" ]; do
        if ! timeout -k 5 "$timeout" xargs -0 -a "$dir/$1.$n" sh -c 'exec "$@"' net-switch </dev/null; then
            say "$1 command $n failed: $(tr '\0' ' ' <"$dir/$1.$n")"
            [ "$2" = strict ] && return 1
        fi
        n=$((n + 1))
    done
    return 0
}

# put a file in place atomically: install_file PATH SOURCE|- MODE [UID GID]
install_file() {
    tmp="${1%/*}/.${1##*/}.xenrun-tmp"
    if [ "$2" = - ]; then
        rm -f -- "$1"
        return
    fi
    cp -- "$2" "$tmp" || return 1
    if [ -n "$4" ]; then
        chown "$4:$5" "$tmp"
        chmod "$3" "$tmp"
    elif [ -e "$1" ]; then
        chown --reference="$1" "$tmp"
        chmod --reference="$1" "$tmp"
    else
        chmod "$3" "$tmp"
    fi
    mv -f -- "$tmp" "$1"
}

new_files() {
    ok=0
    while IFS=$TAB read -r path new mode old omode ouid ogid; do
        install_file "$path" "$new" "$mode" || { say "could not write $path"; ok=1; }
    done <"$dir/files"
    return $ok
}

old_files() {
    while IFS=$TAB read -r path new mode old omode ouid ogid; do
        if [ "$old" = - ]; then
            install_file "$path" - ""
        else
            install_file "$path" "$old" "$omode" "$ouid" "$ogid" || say "could not put back $path"
        fi
    done <"$dir/files"
}

record_before() {
    addresses "$uplink" >"$dir/before.uplink"
    addresses "$bridge" >"$dir/before.bridge"
    had_bridge=no
    ip link show dev "$bridge" >/dev/null 2>&1 && had_bridge=yes
    was_port=no
    is_port "$bridge" "$uplink" && was_port=yes
    old_gw=$(default_gateway "$uplink")
    old_gw_dev=$uplink
    if [ -z "$old_gw" ] && [ "$had_bridge" = yes ]; then
        old_gw=$(default_gateway "$bridge")
        old_gw_dev=$bridge
    fi
    printf '%s %s %s %s\n' "$had_bridge" "$was_port" "${old_gw:--}" "$old_gw_dev" >"$dir/before.state"
}

read_before() {
    read -r had_bridge was_port old_gw old_gw_dev <"$dir/before.state"
    [ "$old_gw" = - ] && old_gw=
}

restore_by_hand() {
    if [ "$had_bridge" = yes ] && [ "$was_port" = yes ]; then
        ip link show dev "$bridge" >/dev/null 2>&1 || ip link add name "$bridge" type bridge
        ip link set dev "$uplink" master "$bridge"
        ip link set dev "$bridge" up
    fi
    ip link set dev "$uplink" up
    while read -r a; do
        [ -n "$a" ] && ip addr replace "$a" brd + dev "$uplink"
    done <"$dir/before.uplink"
    while read -r a; do
        [ -n "$a" ] && ip addr replace "$a" brd + dev "$bridge"
    done <"$dir/before.bridge"
    if [ -n "$old_gw" ]; then
        ip route replace default via "$old_gw" dev "$old_gw_dev" || say "could not put back the default route via $old_gw"
    fi
}

# the old addresses, all there again?
old_network_back() {
    while read -r a; do
        [ -n "$a" ] && { addresses "$uplink" | grep -Fxq -- "$a" || return 1; }
    done <"$dir/before.uplink"
    while read -r a; do
        [ -n "$a" ] && { addresses "$bridge" | grep -Fxq -- "$a" || return 1; }
    done <"$dir/before.bridge"
    [ -z "$old_gw" ] || [ "$(default_gateway "$old_gw_dev")" = "$old_gw" ]
}

revert() {
    say "FAILED: $1"
    say "putting the old network back"
    read_before
    run_commands undo lenient
    # a bridge that failed half way is not taken down by its stack: undo it by hand
    if is_port "$bridge" "$uplink" && [ "$was_port" != yes ]; then
        ip link set dev "$uplink" nomaster
    fi
    if [ "$had_bridge" = no ] && ip link show dev "$bridge" >/dev/null 2>&1; then
        ip link del dev "$bridge"
    fi
    old_files
    run_commands restart lenient
    # the restart may still be bringing an address up (DHCP): give it a moment
    n=0
    while ! old_network_back && [ "$n" -lt 10 ]; do
        sleep 1
        n=$((n + 1))
    done
    if old_network_back; then
        back="the old configuration is running again"
    else
        restore_by_hand
        back="the old addresses were put back by hand: $uplink has $(addresses "$uplink" | tr '\n' ' ')"
    fi
    echo reverted >"$dir/outcome"
    # last, so that it is what a caller showing the tail of the output shows
    say "FAILED: $1; $back"
    exit 1
}

arguments() {
    [ "$#" -eq 6 ] || usage "run takes 6 arguments, got $#"
    dir=$1 bridge=$2 uplink=$3 want=$4 gateway=$5 timeout=$6
    is_dir "$dir" || usage "bad plan folder: $dir"
    is_ifname "$bridge" || usage "bad bridge name: $bridge"
    is_ifname "$uplink" || usage "bad uplink name: $uplink"
    is_address "$want" || usage "bad address: $want"
    [ "$gateway" = - ] || is_ipv4 "$gateway" || usage "bad gateway: $gateway"
    case $timeout in ''|*[!0-9]*) usage "bad timeout: $timeout" ;; esac
}

do_run() {
    arguments "$@"
    record_before
    read_before
    # whoever reached the host through the old default route must still reach it
    need_route=no
    { [ "$gateway" != - ] || [ -n "$old_gw" ]; } && need_route=yes
    say "before: $uplink has $(tr '\n' ' ' <"$dir/before.uplink")default via ${old_gw:-none}; switching to $bridge"
    printf '%s\n' "$@" >"$dir/args"
    run_commands stop lenient
    new_files || revert "the new files could not be written"
    run_commands start strict || revert "bringing $bridge up failed"
    start=$(date +%s)
    while :; do
        problem=$(switch_problem)
        [ -z "$problem" ] && break
        [ $(( $(date +%s) - start )) -ge "$timeout" ] && revert "after $timeout s: $problem"
        sleep 1
    done
    say "ok: $uplink is a port of $bridge, which has $(addresses "$bridge" | tr '\n' ' ')"
    # the watchdog outlives this command and the SSH session that ran it
    if setsid -f "$0" watch "$dir" </dev/null >>"$dir/log" 2>&1; then
        say "waiting up to $timeout s for xenrun to confirm it still reaches the host"
    else
        say "could not leave a watchdog; the switch stands as checked"
        echo confirmed >"$dir/outcome"
    fi
    exit 0
}

do_watch() {
    set -- $(cat "$1/args")
    arguments "$@"
    need_route=no
    start=$(date +%s)
    while [ ! -e "$dir/confirmed" ]; do
        [ $(( $(date +%s) - start )) -ge "$timeout" ] && revert "no confirmation from xenrun within $timeout s"
        sleep 1
    done
    echo confirmed >"$dir/outcome"
    exit 0
}

do_confirm() {
    [ "$#" -eq 1 ] && is_dir "$1" || usage "confirm takes the plan folder"
    : >"$1/confirmed"
    n=0
    while [ ! -s "$1/outcome" ] && [ "$n" -lt 30 ]; do
        sleep 1
        n=$((n + 1))
    done
    outcome=$(cat "$1/outcome" 2>/dev/null)
    [ "$outcome" = confirmed ] && { say "confirmed: the switch stands"; exit 0; }
    say "FAILED: the watchdog had ${outcome:-not answered}; the old network is back"
    exit 1
}

do_check() {
    [ "$#" -eq 3 ] || usage "check takes 3 arguments, got $#"
    if ! { is_ifname "$1" && is_ifname "$2" && is_address "$3"; }; then
        usage "bad arguments to check"
    fi
    problem=$(bridge_problem "$1" "$2" "$3")
    [ -z "$problem" ] && exit 0
    echo "$problem"
    exit 1
}

command=${1:-}
[ "$#" -gt 0 ] && shift
case $command in
    run) do_run "$@" ;;
    watch) do_watch "$@" ;;
    confirm) do_confirm "$@" ;;
    check) do_check "$@" ;;
    *) usage "unknown command: $command" ;;
esac

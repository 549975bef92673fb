# The persistent shell of an SSHTarget, sent to /bin/sh on the host after N=MARKER,
# with @PATH@, @STAT_FORMAT@ and @SMALL@ filled in and this leading comment left out
# (xenrun/targets/ssh/shell.py: prologue()).
#
# The persistent shell's functions. $N is the answer marker, $X a private temp
# folder for command output. Records of x_fetch (one per line, i = index of the
# path in the request): "L i FIELDS|-|?" lstat ("-" absent, "?" unknown),
# "Z i j ..." the targets of the links i, j, ... (NUL-terminated, in that order),
# "K i" one link's target (where readlink cannot take several: newline-ended),
# "C i j ..." the contents of regular files i, j, ... one after the other (cut by
# their sizes from the L records; "c" always, "o" when at most SMALL bytes),
# "M i HEX" the first 4 bytes of a regular file ("m", for find_program),
# "Y" the listings asked for ("/i" NUL, then the names of folder i, each NUL-ended);
# Z, K, C and Y are followed by base64 lines and "." ("!" when reading failed).
# $B: seconds between the "N ALIVE" heartbeats x_beat prints while a command runs
# (the shell's sign of life: none while the shell itself is stopped, $$ being the
# shell's pid in the subshell; x_end stops them before the answer).
# A fetch starts a fixed handful of processes whatever the number of paths: one
# stat for every lstat (x_stat; the shell's own tests find the absent ones), one
# readlink for every link, one base64 for all the listings, then one base64 per
# cat for all the contents (a path with a newline in its name gets a stat of its own).
# Writes (shellfiles.py): x_put FILE UMASK [MODE [UID GID]] makes a new file (a
# leftover removed first; O_EXCL through noclobber, created under UMASK, then
# owner and mode when given, then data from base64 on stdin: a root-owned file of
# mode 0644 is made with that mode by umask 133, one process; others are made
# 0600 by umask 077 until chown and chmod), x_mv renames (mv -T: never into a
# folder), x_fsync fsyncs files and folders (sync FILE...), x_app appends to the
# journal. $XU is the shell's own umask, put back after each (no subshell: a
# fork per file saved). A request's queued steps stop at the first that fails,
# and x_qfail answers "N QFAIL step" with its stderr.
# "N CAN FLAGS" before READY: 1 when writes can go through this shell, 11 with
# truncate (sparse files) too; else they go through SFTP.
PATH=@PATH@:$PATH; export PATH
LC_ALL=C; export LC_ALL
NL='
'
if ! X=$(mktemp -d "${TMPDIR:-/tmp}/xenrun.XXXXXXXX" 2>&1); then
  printf '%s NOTMP %s: %s\n' "$N" "${TMPDIR:-/tmp}" "$(printf '%s' "$X" | tr '\n' ' ')"; exit 1
fi
trap 'rm -rf "$X"' EXIT
trap 'exit 129' HUP
trap 'exit 143' TERM
if command -v timeout >/dev/null 2>&1; then XT=1; else XT=; fi
XU=$(umask)
x_info() {
  if v=$(stat -c '@STAT_FORMAT@' -- "$2" 2>/dev/null); then printf 'L %s %s\n' "$1" "$v"
  else printf 'L %s ?\n' "$1"; fi
}
x_stat() {
  n=$#
  while [ $n -gt 1 ]; do
    m=$1 p=$2; shift 2; n=$((n-2))
    case $m in *l*)
      case $p in *"$NL"*) ;; *) if [ -e "$p" ] || [ -L "$p" ]; then set -- "$@" "$p"; fi;; esac;;
    esac
  done
  : > "$X/s"
  if [ $# -gt 0 ]; then stat -c '@STAT_FORMAT@ %n' -- "$@" > "$X/s" 2>/dev/null; fi
  return 0
}
x_links() {
  n=$# i=0 k= xd=
  while [ $n -gt 1 ]; do
    m=$1 p=$2; shift 2; n=$((n-2))
    case $m in *d*) xd=1;; esac
    case $m in *l*) if [ -L "$p" ]; then set -- "$@" "$p"; k="$k $i"; fi;; esac
    i=$((i+1))
  done
  [ $# -eq 0 ] && return 0
  readlink -z -- "$@" > "$X/k" 2>/dev/null || return 1
  printf 'Z%s\n' "$k"; base64 < "$X/k"; printf '.\n'
}
x_links1() {
  i=0
  while [ $# -gt 1 ]; do
    m=$1 p=$2; shift 2
    case $m in *l*) if [ -L "$p" ]; then printf 'K %s\n' $i; readlink -- "$p" | base64; printf '.\n'; fi;; esac
    i=$((i+1))
  done
}
x_dirs() {
  printf 'Y\n'
  (i=0
   while [ $# -gt 1 ]; do
     case $1 in *d*)
       if [ -d "$2" ] && cd "$2" 2>/dev/null; then
         printf '/%s\000' $i
         for f in * .[!.]* ..?*; do if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\000' "$f"; fi; done
       fi;;
     esac
     shift 2; i=$((i+1))
   done) | base64
  printf '.\n'
}
x_size() { z=; case $1 in 8???) z=$4;; esac; }
x_fetch() {
  x_stat "$@"
  x_links "$@" || x_links1 "$@"
  if [ -n "$xd" ]; then x_dirs "$@"; fi
  exec 8< "$X/s"
  i=0 s= n=$# cs=
  while [ $n -gt 1 ]; do
    m=$1 p=$2; shift 2; n=$((n-2)); f=
    case $m in *l*)
      if [ -z "$s" ]; then IFS= read -r s <&8 || s=; fi
      if [ -n "$s" ] && [ "${s#* * * * * }" = "$p" ]; then f=${s%" $p"}; s=; fi
      if [ -n "$f" ]; then printf 'L %s %s\n' $i "$f"
      elif ! [ -e "$p" ] && ! [ -L "$p" ]; then printf 'L %s -\n' $i
      else case $p in *"$NL"*) x_info $i "$p";; *) printf 'L %s ?\n' $i;; esac
      fi;;
    esac
    case $m in *c*|*o*)
      z=; if [ -n "$f" ]; then x_size $f; fi
      if [ -n "$z" ] && { [ -z "${m##*c*}" ] || [ "$z" -le @SMALL@ ]; }; then
        set -- "$@" "$p"; cs="$cs $i"
      fi;;
    esac
    case $m in *m*)
      z=; if [ -n "$f" ]; then x_size $f; fi
      if [ -n "$z" ]; then printf 'M %s %s\n' $i "$(od -An -tx1 -N4 -- "$p" 2>/dev/null)"; fi;;
    esac
    i=$((i+1))
  done
  exec 8<&-
  if [ -n "$cs" ]; then
    printf 'C%s\n' "$cs"
    if cat -- "$@" | base64; then printf '.\n'; else printf '!\n'; fi
  fi
}
x_t() { t=$1; shift; if [ -n "$t" ] && [ -n "$XT" ]; then exec timeout "$t" "$@"; else exec "$@"; fi; }
x_beat() {
  (while sleep "$B" </dev/null >/dev/null 2>&1; do
     if read -r _ _ s _ </proc/$$/stat 2>/dev/null && [ "$s" = T ]; then continue; fi
     printf '%s ALIVE\n' "$N"
   done) </dev/null 9>&- & h=$!
}
x_end() {
  if [ -n "$h" ]; then kill -9 "$h" 2>/dev/null; wait "$h" 2>/dev/null; h=; fi
  if [ -s "$X/o" ]; then base64 < "$X/o"; fi; printf '%s E\n' "$N"
  if [ -s "$X/e" ]; then base64 < "$X/e"; fi; printf '%s END %s\n' "$N" "$1"
}
x_lock() {
  if ! command exec 9>>"$1"; then printf '%s END 3\n' "$N"; return; fi
  flock -n 9; r=$?
  if [ $r -eq 0 ]; then printf '%s' "$2" > "$1"; printf '%s END 0\n' "$N"; return; fi
  exec 9>&-
  base64 < "$1"; printf '%s END %s\n' "$N" $r
}
x_unlock() { : > "$1"; exec 9>&-; printf '%s END 0\n' "$N"; }
x_put() {
  if [ -e "$1" ] || [ -L "$1" ]; then rm -f -- "$1" || return 1; fi
  set -C; umask "$2"; command exec 3>"$1"; r=$?; set +C; umask "$XU"
  [ $r -eq 0 ] || return $r
  { [ -z "$4" ] || chown "$4:$5" "$1"; } && { [ -z "$3" ] || chmod "$3" "$1"; } && base64 -d >&3; r=$?
  exec 3>&-; return $r
}
x_app() { umask 077; base64 -d >>"$1"; r=$?; umask "$XU"; [ $r -eq 0 ] && x_fsync "$1"; }
x_ln() { rm -f -- "$2" && ln -s -- "$1" "$2"; }
x_mv() { mv -f -T -- "$1" "$2"; }
x_rm() { rm -f -- "$1" && x_fsync "$2"; }
x_fsync() { sync -- "$@"; }
x_sparse() {
  if [ -n "$5" ]; then (umask 077; set -C; : >"$1") && chmod "$2" "$1" || return 1; fi
  s=$(stat -L -c %s -- "$1") || return 1
  if [ "$s" -lt "$3" ]; then truncate -s "$3" -- "$1" || return 1; fi
  sync -- "$1" "$4"
}
x_cut() { if [ -e "$1" ]; then truncate -s "$2" -- "$1"; fi; }
x_qfail() { printf '%s QFAIL %s\n' "$N" "$1"; base64 < "$X/qe"; printf '%s END 1\n' "$N"; }
XW=
if printf 'eA==\n' | base64 -d 2>/dev/null | grep -q x && : > "$X/w" && mv -f -T -- "$X/w" "$X/v" 2>/dev/null \
   && [ -f "$X/v" ] && sync -- "$X/v" "$X" 2>/dev/null && ln -s -- v "$X/l" 2>/dev/null; then XW=1; fi
rm -f -- "$X/v" "$X/w" "$X/l"
if [ -n "$XW" ] && command -v truncate >/dev/null 2>&1; then XW=${XW}1; fi
printf '%s CAN %s\n' "$N" "$XW"
printf '%s READY\n' "$N"

# Helpers sourced by launch/local_cpu.sh and launch/tpu_pod.sh (not run on its own); they set $me first.
# shellcheck shell=bash disable=SC2154,SC2034
# (SC2154: $me is the sourcing script's; SC2034: take's $val and $used are read by the caller.)

# die MESSAGE: one error line and the usage hint, exit status 2.
die() { echo "$me: error: $*" >&2; echo "run 'bash $me --help' for usage" >&2; exit 2; }

# Shell-quotes one word for printing: bare when that is safe, else in single quotes.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
quote_words() {
  local sep="" word
  for word in "$@"; do printf '%s' "$sep"; quote "$word"; sep=" "; done
  printf '\n'
}
# take OPTION [VALUE]: the value of `--opt=value` or `--opt value` in $val, the words consumed in $used.
take() {
  if [[ $1 == --*=* ]]; then val=${1#*=}; used=1
  elif [ $# -ge 2 ] && [[ $2 != --* ]]; then val=$2; used=2
  else die "$1 needs a value"; fi
}

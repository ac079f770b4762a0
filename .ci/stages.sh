# Sourced by .ci/run: `stage NAME CMD...` runs one stage of CI and `stages_summary` ends the run.
#
# A stage prints its command, then its exit code and how long it took; a failed stage never stops the stages after
# it (one red stage must not hide the others). stages_summary prints every stage's time and exit code and returns
# non-zero if any stage failed.

stage_names=() stage_seconds=() stage_codes=()

stage() {
  local name=$1 start=$SECONDS code
  shift
  echo "=== stage $name: $*"
  "$@"
  code=$?
  echo "=== stage $name: exit $code after $((SECONDS - start)) s"
  stage_names+=("$name") stage_seconds+=($((SECONDS - start))) stage_codes+=("$code")
  return 0
}

stages_summary() {
  local i failed=0
  echo
  echo "=== stages"
  for i in "${!stage_names[@]}"; do
    printf '%-22s %6s s  exit %s\n' "${stage_names[$i]}" "${stage_seconds[$i]}" "${stage_codes[$i]}"
    [ "${stage_codes[$i]}" = 0 ] || failed=1
  done
  printf '%-22s %6s s\n' total "$SECONDS"
  if [ "$failed" != 0 ]; then
    echo "CI failed: the stages above with a non-zero exit code" >&2
    return 1
  fi
}

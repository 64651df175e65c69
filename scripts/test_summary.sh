#!/usr/bin/env bash
# The suite's summary after ctest (scripts/test.sh calls it): GoogleTest and unittest (tests/reference)
# cases passed, skipped (grouped by reason, naming the tests) and failed, from the per-executable results
# that tests/support/test_main.cpp and tests/reference/ptkref.py write to <build>/test-results/, plus what ctest said of each executable (one that crashed or timed
# out has no line for the cases it never finished). Exits 1 when anything failed.
#   scripts/test_summary.sh [build-dir] [ctest-output-log]
set -euo pipefail
build=${1:-build}
log=${2:-}
results="$build/test-results"

shopt -s nullglob
files=("$results"/*.tsv)
if [ ${#files[@]} -eq 0 ]; then
  echo "test summary: no results in $results (did ctest run?)" >&2
  exit 1
fi

awk -F'\t' '
  { n[$1]++ ; exes[$2] = 1 }
  $1 == "skipped" { reason = ($4 == "" ? "(no reason given)" : $4); count[reason]++
                    who[reason] = who[reason] (who[reason] == "" ? "" : ", ") $2 ":" $3 }
  $1 == "failed"  { failed = failed "\n  " $2 ": " $3 }
  END {
    ne = 0; for (e in exes) ne++
    printf "test summary: %d passed, %d skipped, %d failed (GoogleTest and unittest cases of %d executables)\n",
           n["passed"], n["skipped"], n["failed"], ne
    if (n["skipped"] > 0) {
      print "skipped, by reason:"
      for (r in count) printf "  %3d  %s\n       %s\n", count[r], r, who[r]
    }
    if (n["failed"] > 0) print "failed:" failed
  }' "${files[@]}"

status=0
if grep -q '^failed' "${files[@]}"; then status=1; fi
if [ -n "$log" ] && [ -f "$log" ]; then
  # ctest's own verdicts: a crash, a timeout or a non-GoogleTest test shows only here.
  ctest_line=$(grep -E '^[0-9]+% tests passed' "$log" | tail -1 || true)
  [ -n "$ctest_line" ] && echo "ctest (executables): $ctest_line"
  not_run=$(awk '/^The following tests did not run:/{f=1;next} /^[^ \t]/{f=0} f' "$log")
  [ -n "$not_run" ] && { echo "ctest: did not run (every case skipped):"; echo "$not_run"; }
  bad=$(awk '/^The following tests FAILED:/{f=1;next} /^[^ \t]/{f=0} f' "$log")
  if [ -n "$bad" ]; then
    echo "ctest: FAILED:"
    echo "$bad"
    status=1
  fi
fi
exit $status

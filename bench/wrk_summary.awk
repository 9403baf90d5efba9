# Reads `wrk --latency` output; prints "req/s p50_ms p99_ms errors" (errors = socket errors
# + non-2xx/3xx responses), or exits 1 when wrk printed no result. Used by bench/run.sh and
# bench/overload.sh.
function ms(v) {
    if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0;
    if (v ~ /m$/) return v * 60000; if (v ~ /s$/) return v * 1000; return v + 0 }
$1 == "50%" { p50 = ms($2) }
$1 == "99%" { p99 = ms($2) }
/^Requests\/sec:/ { rps = $2 }
/Socket errors:/ { gsub(",", ""); err += $4 + $6 + $8 + $10 }
/Non-2xx or 3xx responses:/ { err += $NF }
END { if (rps == "") exit 1; printf "%s %s %s %d\n", rps, p50, p99, err }

#!/usr/bin/env bash
# MCTP vs UFTP, side by side in one run, over real UDP multicast between network namespaces.
#
# Topology (created here, removed on exit): one namespace per host, every veth on one bridge
# (multicast snooping off, MTU 9000), sender 10.77.0.1, receivers 10.77.0.11... Loss is made
# with nftables on the bridge: `numgen random mod 100 < LOSS drop` on every UDP datagram the
# sender emits (data and control, both tools alike) as it enters the bridge, so all receivers
# see the same loss pattern. The rule before it counts the bytes the sender emitted (before the
# drop), which is the "bytes sent ÷ payload" column for both tools (IP+UDP headers included).
# LOSS_MODE=independent drops instead on each receiver's port (bridge forward hook, once per
# copy), so every receiver loses its own random share and the union of losses grows with the
# receivers.
#
# LINK_MBIT, when set, makes the sender's link a real bottleneck: a `tbf` qdisc at that rate on
# its veth (a switch port of that speed: what exceeds it queues for 5 ms, then is dropped).
# Without it the "link" is as fast as the CPUs can copy, and the machine's CPU share decides.
#
# Every (loss, receivers) point runs REPEAT times, the tools interleaved (MCTP first in odd
# repeats, UFTP first in even ones, so neither always gets the warmer or quieter slot), and a
# summary gives per tool the median wall time with its min–max spread, the ratio of medians
# UFTP ÷ MCTP (= MCTP's throughput as a multiple of UFTP's) and the range of the per-repeat
# ratios: on a shared machine single runs differ by more than the tools do. "rx CPU s" is the
# user + system CPU time of all receiver processes together (and "tx CPU s" the sender's): on a
# host whose cores are shared, what each tool costs is steadier than its wall time. MCTP's sender line
# (passes, repairs during the pass, checkpoints, final rate) is kept per run in the rows.
#
# Usage (root): mctp-vs-uftp.sh            # 256 MiB, 1/4/16 receivers, 0 % and 5 % loss
#   SIZE_MIB=16 RECEIVERS="1 4" LOSSES="0 5" CMOVER=target/release/cmover mctp-vs-uftp.sh
# Env: SIZE_MIB, RECEIVERS, LOSSES, CMOVER (path to cmover), RATE_MBIT (MCTP start rate, cap is
# 2x, or LINK_MBIT when set), UFTP_RATE_KBIT (UFTP fixed rate), BLOCK (frame/block payload
# bytes for both tools), TOOLS ("mctp uftp"), REPEAT (1), LINK_MBIT (unset), KNOWN_HASH (1).
#
# KNOWN_HASH=1 gives MCTP the file's BLAKE3 (`--blake3`, computed once before any run), as a
# group leader has it from the manifest the assignment arrived with: the session starts without
# a pass over the file. KNOWN_HASH=0 makes the sender hash the file first (inside its time).
set -euo pipefail

SIZE_MIB=${SIZE_MIB:-256}
RECEIVERS=${RECEIVERS:-"1 4 16"}
LOSSES=${LOSSES:-"0 5"}
CMOVER=${CMOVER:-cmover}
# Both tools get the same ceiling, 16 Gbit/s: MCTP starts at half and adapts; UFTP sends at it.
# A scan of UFTP at 2, 4, 8 and 16 Gbit/s found 8 and 16 its fastest and alike (one receiver:
# 1.15 s at 2, 0.58 at 8, 0.65 at 16; 16 receivers: 5.3, 5.2 s at 8 and 16, 0 % loss; at 5 %
# within 5 %), so a higher common ceiling costs UFTP nothing, and a lower one would hold MCTP
# at the ceiling (at 8 Gbit/s the pass alone takes 0.27 s of 256 MiB).
RATE_MBIT=${RATE_MBIT:-8000}
UFTP_RATE_KBIT=${UFTP_RATE_KBIT:-16000000}
BLOCK=${BLOCK:-8800}
TOOLS=${TOOLS:-"mctp uftp"}
REPEAT=${REPEAT:-1}
LINK_MBIT=${LINK_MBIT:-}
LOSS_MODE=${LOSS_MODE:-same}
KNOWN_HASH=${KNOWN_HASH:-1}
MAX_RATE_MBIT=${MAX_RATE_MBIT:-$((RATE_MBIT * 2))}
if [ -n "$LINK_MBIT" ]; then
  # Both tools paced at the link's speed (MCTP may not exceed it; UFTP is told exactly it).
  RATE_MBIT=$LINK_MBIT MAX_RATE_MBIT=$LINK_MBIT UFTP_RATE_KBIT=$((LINK_MBIT * 1000))
fi
MTU=9000
P=cmb                      # namespace / interface prefix
GROUP=239.77.9.1:47300     # MCTP data channel
UFTP_PUB=239.77.9.2 UFTP_PRIV=239.77.9.3 UFTP_PORT=47310

[ "$(id -u)" = 0 ] || { echo "run as root (network namespaces)"; exit 1; }
# Errors in the logs as one line each, not as backtraces.
export RUST_BACKTRACE=0 RUST_LIB_BACKTRACE=0
CMOVER=$(command -v "$CMOVER" || echo "$CMOVER")
WORK=${WORK_DIR:-$(mktemp -d)}
MAXN=0; for n in $RECEIVERS; do [ "$n" -gt "$MAXN" ] && MAXN=$n; done

cleanup() {
  for pid in $(jobs -p); do kill "$pid" 2>/dev/null || true; done
  for i in $(seq 1 "$MAXN"); do ip netns del "$P-rx$i" 2>/dev/null || true; done
  ip netns del "$P-tx" 2>/dev/null || true
  ip netns del "$P-br" 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

ip netns add "$P-br"
ip -n "$P-br" link add br0 type bridge mcast_snooping 0
ip -n "$P-br" link set br0 up
add_host() { # name addr
  ip netns add "$P-$1"
  ip link add "v-$1" mtu $MTU netns "$P-$1" type veth peer name "p-$1" mtu $MTU netns "$P-br"
  ip -n "$P-br" link set "p-$1" master br0 up
  ip -n "$P-$1" link set lo up
  ip -n "$P-$1" link set "v-$1" up
  ip -n "$P-$1" addr add "$2/24" dev "v-$1"
  ip -n "$P-$1" route add 224.0.0.0/4 dev "v-$1"
}
add_host tx 10.77.0.1
[ -z "$LINK_MBIT" ] || ip netns exec "$P-tx" tc qdisc add dev v-tx root tbf rate "${LINK_MBIT}mbit" burst 512kb latency 5ms
for i in $(seq 1 "$MAXN"); do add_host "rx$i" "10.77.0.$((10 + i))"; done

FILE=$WORK/payload.bin
head -c $((SIZE_MIB << 20)) /dev/urandom > "$FILE"
SIZE=$(stat -c %s "$FILE")
HASH_ARGS=()
[ "$KNOWN_HASH" = 0 ] || HASH_ARGS=(--blake3 "$("$CMOVER" mctp hash "$FILE")")

# Before each run, outside its timing: only the bridge ports of this point's n receivers are
# up (the bridge floods multicast to every port; the idle namespaces of larger points would
# otherwise cost every datagram a copy and a drop each), and the previous run's copies
# (deleted, but possibly still being written back) are flushed, so no run pays for another.
settle() { # n
  for i in $(seq 1 "$MAXN"); do ip -n "$P-br" link set "p-rx$i" "$( [ "$i" -le "$1" ] && echo up || echo down )"; done
  sync; sleep 0.5
}

set_loss() { # percent
  # On the bridge, where the sender's port enters it (prerouting: once per datagram, before the
  # bridge floods it), so every receiver sees the same loss and the sender never sees an error.
  # Dropping in the sender's own output hook instead makes sendmsg fail with EPERM, which UFTP
  # treats as fatal.
  ip netns exec "$P-br" nft delete table bridge $P 2>/dev/null || true
  local pre="" fwd=""
  if [ "$LOSS_MODE" = independent ]; then
    fwd="iifname \"p-tx\" ether type ip ip protocol udp numgen random mod 100 < $1 drop"
  else
    pre="iifname \"p-tx\" ether type ip ip protocol udp numgen random mod 100 < $1 drop"
  fi
  ip netns exec "$P-br" nft -f - <<NFT
table bridge $P {
  chain pre {
    type filter hook prerouting priority 0;
    iifname "p-tx" ether type ip ip protocol udp counter
    $pre
  }
  chain out {
    type filter hook forward priority 0;
    $fwd
  }
}
NFT
}
sent_bytes() { ip netns exec "$P-br" nft list chain bridge $P pre | awk '/counter/ { for (i = 1; i <= NF; i++) if ($i == "bytes") { print $(i + 1); exit } }'; }
now() { date +%s.%N; }
peak_rss() { awk '{ print $1 }' "$@" | sort -n | tail -1; }
# CPU seconds (user + system) summed over the files of `/usr/bin/time -f "%M %U %S"` given.
cpu_sum() { awk '{ s += $2 + $3 } END { printf "%.2f", s }' "$@"; }
check_copies() { # dir-prefix n
  local ok=0
  for i in $(seq 1 "$2"); do
    f=$(find "$1$i" -type f ! -name '.*' | head -1)
    [ -n "$f" ] && cmp -s "$f" "$FILE" && ok=$((ok + 1))
  done
  echo "$ok"
}

run_mctp() { # n loss
  local n=$1 pids=()
  set_loss "$2"
  settle "$n"
  for i in $(seq 1 "$n"); do
    mkdir -p "$WORK/m$i"
    CM_CLUSTER_SECRET=bench ip netns exec "$P-rx$i" /usr/bin/time -f "%M %U %S" -o "$WORK/rss-m$i" \
      "$CMOVER" mctp receive --group $GROUP --interface "10.77.0.$((10 + i))" --dir "$WORK/m$i" --member-id "$i" \
      --timeout-secs 900 >"$WORK/m$i.log" 2>&1 &
    pids+=($!)
  done
  sleep 0.5
  local t0 t1
  t0=$(now)
  CM_CLUSTER_SECRET=bench ip netns exec "$P-tx" /usr/bin/time -f "0 %U %S" -o "$WORK/cpu-tx" "$CMOVER" mctp send "$FILE" --group $GROUP --interface 10.77.0.1 \
    --expect "$n" --frame-size "$BLOCK" --rate-mbit "$RATE_MBIT" --max-rate-mbit "$MAX_RATE_MBIT" "${HASH_ARGS[@]}" >"$WORK/mtx.log" 2>&1 || true
  t1=$(now)
  wait "${pids[@]}" 2>/dev/null || true
  local ok; ok=$(check_copies "$WORK/m" "$n")
  row MCTP "$n" "$2" "$t0" "$t1" "$(sent_bytes)" "$(peak_rss "$WORK"/rss-m*)" "$ok" "$(cpu_sum "$WORK"/rss-m*)" "$(cpu_sum "$WORK/cpu-tx")" \
    "$(grep -o 'passes=[0-9]*\|repairs=[0-9]*\|checkpoints=[0-9]*\|final_rate_mbit=[0-9]*' "$WORK/mtx.log" | paste -sd' ')"
  if [ "$ok" != "$n" ]; then # the sender's and every receiver's last words, kept for a look
    local keep; keep="$WORK/failed-$(date +%s%N)"; mkdir -p "$keep"; cp "$WORK"/m*.log "$keep/" 2>/dev/null || true
    { echo "  MCTP logs (all in $WORK/failed-*, kept with KEEP=1):"
      for f in "$WORK"/mtx.log "$WORK"/m[0-9]*.log; do echo "  $(basename "$f"): $(tail -n 3 "$f" | tr '\n' ' ')"; done; } >&2
  fi
  cp "$WORK/mtx.log" "$WORK/last-mctp-sender.log" # (set RUST_LOG=debug to see its passes)
  rm -rf "$WORK"/m* "$WORK"/rss-m* "$WORK/cpu-tx"
}

# UFTP client ids default to the client's IPv4 address in hex (closed group: start as soon as
# every receiver answered the announcement, as MCTP does with --expect).
uftp_ids() { for i in $(seq 1 "$1"); do printf "0x0A4D00%02X\n" $((10 + i)); done | paste -sd, -; }

run_uftp() { # n loss
  local n=$1 pids=()
  set_loss "$2"
  settle "$n"
  for i in $(seq 1 "$n"); do
    mkdir -p "$WORK/u$i"
    ip netns exec "$P-rx$i" /usr/bin/time -f "%M %U %S" -o "$WORK/rss-u$i" \
      uftpd -d -D "$WORK/u$i" -I "v-rx$i" -M $UFTP_PUB -p $UFTP_PORT -L "$WORK/u$i.log" >/dev/null 2>&1 &
    pids+=($!)
  done
  sleep 0.5
  local t0 t1
  t0=$(now)
  ip netns exec "$P-tx" /usr/bin/time -f "0 %U %S" -o "$WORK/cpu-tx" uftp -I v-tx -M $UFTP_PUB -P $UFTP_PRIV -p $UFTP_PORT -R "$UFTP_RATE_KBIT" -b "$BLOCK" \
    -Y none -H "$(uftp_ids "$n")" -L "$WORK/utx.log" "$FILE" >/dev/null 2>&1 || true
  t1=$(now)
  # /usr/bin/time ignores SIGINT while its child runs: stop each uftpd itself.
  for p in "${pids[@]}"; do for c in $(pgrep -P "$p"); do kill -INT "$c" 2>/dev/null || true; done; done
  wait "${pids[@]}" 2>/dev/null || true
  local ok; ok=$(check_copies "$WORK/u" "$n")
  row UFTP "$n" "$2" "$t0" "$t1" "$(sent_bytes)" "$(peak_rss "$WORK"/rss-u*)" "$ok" "$(cpu_sum "$WORK"/rss-u*)" "$(cpu_sum "$WORK/cpu-tx")"
  [ "$ok" = "$n" ] || { echo "  UFTP sender log:"; tail -n 4 "$WORK/utx.log" "$WORK/u1.log" || true; } >&2
  rm -rf "$WORK"/u[0-9]* "$WORK"/rss-u* "$WORK/cpu-tx"
}

row() { # tool n loss t0 t1 bytes rss_kb copies rx_cpu tx_cpu [notes]
  awk -v tool="$1" -v n="$2" -v loss="$3" -v t0="$4" -v t1="$5" -v b="$6" -v rss="$7" -v ok="$8" -v rxc="$9" -v txc="${10}" -v notes="${11:-}" -v rep="$r" -v size="$SIZE" 'BEGIN {
    s = t1 - t0;
    printf "%-5s %4d %5s%% %9.2f %10.1f %9.3f %10.1f %6d/%d %3d %8.2f %8.2f  %s\n", tool, n, loss, s, size / s / 1e6, b / size, rss / 1024, ok, n, rep, rxc, txc, notes }' | tee -a "$WORK/rows"
}

# Per point: each tool's median wall time (runs where every copy arrived) with its min–max,
# the ratio of the medians UFTP ÷ MCTP, and the min–max of the per-repeat ratios (MCTP and UFTP
# runs of the same repeat, both complete).
summary() {
  echo
  echo "over $REPEAT repeat(s), runs with every copy only; ratio = UFTP time / MCTP time (median of each; per-repeat range)"
  printf "%4s %6s %19s %19s %6s %13s %9s %9s %15s\n" rcv loss "MCTP s med [min-max]" "UFTP s med [min-max]" ratio "[rep. range]" "MCTP s/p" "UFTP s/p" "rx CPU s M / U"
  awk '{ split($8, c, "/"); if (c[1] == c[2]) { k = $2 " " $3; t[$1, k] = t[$1, k] " " $4; r[$1, k] = r[$1, k] " " $6; cpu[$1, k] = cpu[$1, k] " " $10; by[$1, k, $9] = $4; reps[k, $9] = 1; keys[k] = 1 } }
    function sort(list, a,   n, i, j, x) { n = split(list, a, " ")
      for (i = 2; i <= n; i++) { x = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > x; j--) a[j + 1] = a[j]; a[j + 1] = x }
      return n }
    function med(list,   a, n) { n = sort(list, a); if (n == 0) return -1; return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
    function lo(list,   a, n) { n = sort(list, a); return n ? a[1] : -1 }
    function hi(list,   a, n) { n = sort(list, a); return n ? a[n] : -1 }
    END { for (k in keys) { split(k, p, " "); m = med(t["MCTP", k]); u = med(t["UFTP", k]); rl = ""
      for (q in reps) { split(q, qq, SUBSEP); if (qq[1] == k && (("MCTP", k, qq[2]) in by) && (("UFTP", k, qq[2]) in by)) rl = rl " " by["UFTP", k, qq[2]] / by["MCTP", k, qq[2]] }
      printf "%4d %6s %6.2f [%5.2f-%5.2f] %6.2f [%5.2f-%5.2f] %6s %13s %9.3f %9.3f %7.2f / %5.2f\n", p[1], p[2], m, lo(t["MCTP", k]), hi(t["MCTP", k]), u, lo(t["UFTP", k]), hi(t["UFTP", k]),
        (m > 0 && u > 0) ? sprintf("%.2f", u / m) : "-", rl == "" ? "-" : sprintf("[%.2f-%.2f]", lo(rl), hi(rl)), med(r["MCTP", k]), med(r["UFTP", k]), med(cpu["MCTP", k]), med(cpu["UFTP", k]) } }' "$WORK/rows" | sort -k2,2n -k1,1n
}

printf "%s MiB, block %s bytes, MTU %s, MCTP %s, link %s, loss %s (nft numgen random)\n" \
  "$SIZE_MIB" "$BLOCK" $MTU "$( [ "$KNOWN_HASH" = 0 ] && echo "hashes the file first" || echo "given the file's BLAKE3" )" "$( [ -n "$LINK_MBIT" ] && echo "$LINK_MBIT Mbit/s (tbf)" || echo unshaped )" \
  "$( [ "$LOSS_MODE" = independent ] && echo "per receiver, independent" || echo "where the sender's port enters the bridge (same for all)" )"
: > "$WORK/rows"
printf "%-5s %4s %6s %9s %10s %9s %10s %8s %3s %8s %8s  %s\n" tool rcv loss "wall s" "goodput MB/s" "sent/pay" "rx RSS MiB" copies rep "rx CPU s" "tx CPU s" "MCTP sender"
for loss in $LOSSES; do
  for n in $RECEIVERS; do
    for r in $(seq 1 "$REPEAT"); do
      order=$TOOLS
      [ $((r % 2)) = 0 ] && order=$(echo "$TOOLS" | tr ' ' '\n' | tac | paste -sd' ')
      for tool in $order; do "run_$tool" "$n" "$loss"; done
    done
  done
done
summary

#!/usr/bin/env bash
# MCTP vs UFTP, side by side in one run, over real UDP multicast between network namespaces.
#
# Topology (created here, removed on exit): one namespace per host, every veth on one bridge
# (multicast snooping off, MTU 9000), sender 10.77.0.1, receivers 10.77.0.11... Loss is made
# with nftables in the sender's namespace: `numgen random mod 100 < LOSS drop` on every UDP
# datagram the sender emits (data and control, both tools alike), so all receivers see the same
# loss pattern. The same nft rule counts the bytes the sender emitted (before the drop), which is
# the "bytes sent ÷ payload" column for both tools (IP+UDP headers included).
#
# Usage (root): mctp-vs-uftp.sh            # 256 MiB, 1/4/16 receivers, 0 % and 5 % loss
#   SIZE_MIB=16 RECEIVERS="1 4" LOSSES="0 5" CMOVER=target/release/cmover mctp-vs-uftp.sh
# Env: SIZE_MIB, RECEIVERS, LOSSES, CMOVER (path to cmover), RATE_MBIT (MCTP start rate, cap is
# 2x), UFTP_RATE_KBIT (UFTP fixed rate), BLOCK (frame/block payload bytes for both tools),
# TOOLS ("mctp uftp").
set -euo pipefail

SIZE_MIB=${SIZE_MIB:-256}
RECEIVERS=${RECEIVERS:-"1 4 16"}
LOSSES=${LOSSES:-"0 5"}
CMOVER=${CMOVER:-cmover}
RATE_MBIT=${RATE_MBIT:-2000}
UFTP_RATE_KBIT=${UFTP_RATE_KBIT:-2000000}
BLOCK=${BLOCK:-8800}
TOOLS=${TOOLS:-"mctp uftp"}
MTU=9000
P=cmb                      # namespace / interface prefix
GROUP=239.77.9.1:47300     # MCTP data channel
UFTP_PUB=239.77.9.2 UFTP_PRIV=239.77.9.3 UFTP_PORT=47310

[ "$(id -u)" = 0 ] || { echo "run as root (network namespaces)"; exit 1; }
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
for i in $(seq 1 "$MAXN"); do add_host "rx$i" "10.77.0.$((10 + i))"; done

FILE=$WORK/payload.bin
head -c $((SIZE_MIB << 20)) /dev/urandom > "$FILE"
SIZE=$(stat -c %s "$FILE")

set_loss() { # percent
  ip netns exec "$P-tx" nft delete table inet $P 2>/dev/null || true
  ip netns exec "$P-tx" nft -f - <<NFT
table inet $P {
  chain out {
    type filter hook output priority 0;
    meta l4proto udp counter
    meta l4proto udp numgen random mod 100 < $1 drop
  }
}
NFT
}
sent_bytes() { ip netns exec "$P-tx" nft list chain inet $P out | awk '/counter/ { for (i = 1; i <= NF; i++) if ($i == "bytes") { print $(i + 1); exit } }'; }
now() { date +%s.%N; }
peak_rss() { sort -n "$@" | tail -1; }
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
  for i in $(seq 1 "$n"); do
    mkdir -p "$WORK/m$i"
    CM_CLUSTER_SECRET=bench ip netns exec "$P-rx$i" /usr/bin/time -f %M -o "$WORK/rss-m$i" \
      "$CMOVER" mctp receive --group $GROUP --interface "10.77.0.$((10 + i))" --dir "$WORK/m$i" --member-id "$i" \
      --timeout-secs 900 >"$WORK/m$i.log" 2>&1 &
    pids+=($!)
  done
  sleep 0.5
  local t0 t1
  t0=$(now)
  CM_CLUSTER_SECRET=bench ip netns exec "$P-tx" "$CMOVER" mctp send "$FILE" --group $GROUP --interface 10.77.0.1 \
    --expect "$n" --frame-size "$BLOCK" --rate-mbit "$RATE_MBIT" --max-rate-mbit $((RATE_MBIT * 2)) >"$WORK/mtx.log" 2>&1 || true
  t1=$(now)
  wait "${pids[@]}" 2>/dev/null || true
  local ok; ok=$(check_copies "$WORK/m" "$n")
  row MCTP "$n" "$2" "$t0" "$t1" "$(sent_bytes)" "$(peak_rss "$WORK"/rss-m*)" "$ok"
  [ "$ok" = "$n" ] || { echo "  MCTP logs:"; tail -n 4 "$WORK/mtx.log" "$WORK/m1.log" || true; } >&2
  rm -rf "$WORK"/m* "$WORK"/rss-m*
}

# UFTP client ids default to the client's IPv4 address in hex (closed group: start as soon as
# every receiver answered the announcement, as MCTP does with --expect).
uftp_ids() { for i in $(seq 1 "$1"); do printf "0x0A4D00%02X\n" $((10 + i)); done | paste -sd, -; }

run_uftp() { # n loss
  local n=$1 pids=()
  set_loss "$2"
  for i in $(seq 1 "$n"); do
    mkdir -p "$WORK/u$i"
    ip netns exec "$P-rx$i" /usr/bin/time -f %M -o "$WORK/rss-u$i" \
      uftpd -d -D "$WORK/u$i" -I "v-rx$i" -M $UFTP_PUB -p $UFTP_PORT -L "$WORK/u$i.log" >/dev/null 2>&1 &
    pids+=($!)
  done
  sleep 0.5
  local t0 t1
  t0=$(now)
  ip netns exec "$P-tx" uftp -I v-tx -M $UFTP_PUB -P $UFTP_PRIV -p $UFTP_PORT -R "$UFTP_RATE_KBIT" -b "$BLOCK" \
    -Y none -H "$(uftp_ids "$n")" -L "$WORK/utx.log" "$FILE" >/dev/null 2>&1 || true
  t1=$(now)
  # /usr/bin/time ignores SIGINT while its child runs: stop each uftpd itself.
  for p in "${pids[@]}"; do for c in $(pgrep -P "$p"); do kill -INT "$c" 2>/dev/null || true; done; done
  wait "${pids[@]}" 2>/dev/null || true
  local ok; ok=$(check_copies "$WORK/u" "$n")
  row UFTP "$n" "$2" "$t0" "$t1" "$(sent_bytes)" "$(peak_rss "$WORK"/rss-u*)" "$ok"
  [ "$ok" = "$n" ] || { echo "  UFTP sender log:"; tail -n 4 "$WORK/utx.log" "$WORK/u1.log" || true; } >&2
  rm -rf "$WORK"/u[0-9]* "$WORK"/rss-u*
}

row() { # tool n loss t0 t1 bytes rss_kb copies
  awk -v tool="$1" -v n="$2" -v loss="$3" -v t0="$4" -v t1="$5" -v b="$6" -v rss="$7" -v ok="$8" -v size="$SIZE" 'BEGIN {
    s = t1 - t0;
    printf "%-5s %4d %5s%% %9.2f %10.1f %9.3f %10.1f %6d/%d\n", tool, n, loss, s, size / s / 1e6, b / size, rss / 1024, ok, n }'
}

printf "%s MiB, block %s bytes, MTU %s, loss at the sender's egress (nft numgen random)\n" "$SIZE_MIB" "$BLOCK" $MTU
printf "%-5s %4s %6s %9s %10s %9s %10s %8s\n" tool rcv loss "wall s" "goodput MB/s" "sent/pay" "rx RSS MiB" copies
for loss in $LOSSES; do
  for n in $RECEIVERS; do
    for tool in $TOOLS; do "run_$tool" "$n" "$loss"; done
  done
done

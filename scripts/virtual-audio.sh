#!/usr/bin/env bash
# Virtual sound devices on a machine with no sound card: a PulseAudio server with two mono
# 48 kHz null sinks, llvc_in and llvc_out, each with a silent pacat keepalive (without one, an
# idle sink's monitor records late). Same recipe as tests/pulse.py
# (/work/shared/notes/virtual-audio.md).
#
#   scripts/virtual-audio.sh start   # start it (if not running) and print the export lines
#   scripts/virtual-audio.sh env     # print the export lines:  eval "$(scripts/virtual-audio.sh env)"
#   scripts/virtual-audio.sh stop    # stop the keepalives and the server
#
# With the exports, PortAudio (llvc devices) lists llvc_in, llvc_out, pulse and default:
# output to llvc_in plays into that sink, input from llvc_in records what was played into it
# (llvc_in.monitor); pulse/default play to llvc_in and record llvc_in.monitor unless
# PULSE_SINK / PULSE_SOURCE say otherwise. E.g. play a file into llvc_in, convert it live:
#   llvc run --source device:llvc_in --sink device:llvc_out
set -euo pipefail

RUN_DIR=${LLVC_AUDIO_DIR:-${XDG_RUNTIME_DIR:-/tmp}/llvc-virtual-audio}
SINKS=(llvc_in llvc_out)
RATE=48000
SOCKET=$RUN_DIR/native
ALSA_CONF=/usr/share/alsa/alsa.conf

die() { echo "virtual-audio: $*" >&2; exit 1; }

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

print_env() {
    echo "export PULSE_SERVER=unix:$SOCKET"
    if [[ -f $ALSA_CONF ]]; then
        echo "export ALSA_CONFIG_PATH=$ALSA_CONF:$RUN_DIR/asound.conf"
    fi
}

has_sinks() {  # whether the server answers and lists every sink
    local listed s
    listed=$(PULSE_SERVER=unix:$SOCKET pactl list short sinks 2>/dev/null) || return 1
    for s in "${SINKS[@]}"; do
        grep -q "^[0-9]*	$s	" <<<"$listed" || return 1
    done
}

start() {
    for b in pulseaudio pacat pactl; do
        command -v $b >/dev/null || die "$b not found: apt-get install pulseaudio pulseaudio-utils libasound2-plugins"
    done
    if alive "$RUN_DIR/server.pid"; then
        echo "virtual-audio: already running (pid $(cat "$RUN_DIR/server.pid"))" >&2
        print_env
        return
    fi
    mkdir -p "$RUN_DIR"/{home,run,config}
    chmod 700 "$RUN_DIR"/{home,run,config}
    {
        echo "load-module module-native-protocol-unix socket=$SOCKET auth-anonymous=1"
        for s in "${SINKS[@]}"; do echo "load-module module-null-sink sink_name=$s rate=$RATE channels=1"; done
        echo "set-default-sink ${SINKS[0]}"
        echo "set-default-source ${SINKS[0]}.monitor"
    } >"$RUN_DIR/server.pa"
    # ALSA pcms named after the sinks (ALSA's pulse plugin): playback -> the sink, capture -> its monitor.
    for s in "${SINKS[@]}"; do
        echo "pcm.$s { type asym; playback.pcm { type pulse; device \"$s\" } capture.pcm { type pulse; device \"$s.monitor\" } hint { show on; description \"PulseAudio null sink $s\" } }"
    done >"$RUN_DIR/asound.conf"
    rm -f "$SOCKET"
    HOME=$RUN_DIR/home XDG_RUNTIME_DIR=$RUN_DIR/run XDG_CONFIG_HOME=$RUN_DIR/config \
        setsid pulseaudio -n --daemonize=no --exit-idle-time=-1 --system=false --use-pid-file=no \
        --disable-shm=yes --log-target=stderr -F "$RUN_DIR/server.pa" \
        </dev/null >"$RUN_DIR/pulseaudio.log" 2>&1 &
    echo $! >"$RUN_DIR/server.pid"
    local ready=""
    for _ in $(seq 100); do
        alive "$RUN_DIR/server.pid" || { tail -n 15 "$RUN_DIR/pulseaudio.log" >&2; die "pulseaudio exited"; }
        if has_sinks; then ready=1; break; fi
        sleep 0.1
    done
    [[ -n $ready ]] || { tail -n 15 "$RUN_DIR/pulseaudio.log" >&2; stop; die "no sinks after 10 s"; }
    for s in "${SINKS[@]}"; do
        PULSE_SERVER=unix:$SOCKET setsid pacat --playback -d "$s" --latency-msec=20 --rate=$RATE --channels=1 \
            --format=s16le /dev/zero </dev/null >/dev/null 2>&1 &
        echo $! >"$RUN_DIR/keepalive-$s.pid"
    done
    echo "virtual-audio: PulseAudio running (pid $(cat "$RUN_DIR/server.pid"), sinks ${SINKS[*]}, log $RUN_DIR/pulseaudio.log)" >&2
    print_env
}

stop() {
    local pidfile pid
    for pidfile in "$RUN_DIR"/keepalive-*.pid "$RUN_DIR/server.pid"; do
        [[ -f $pidfile ]] || continue
        pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        fi
        rm -f "$pidfile"
    done
    rm -f "$SOCKET"
}

case "${1:-}" in
    start) start ;;
    stop) stop; echo "virtual-audio: stopped" >&2 ;;
    env) alive "$RUN_DIR/server.pid" || die "not running (scripts/virtual-audio.sh start)"; print_env ;;
    *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac

#!/usr/bin/python3
"""A small RTSP server for tests and benchmarks (GStreamer's gst-rtsp-server).

Serves H.264 files as cameras on 127.0.0.1:

    /usr/bin/python3 tools/rtsp_server.py --port 8554 --mount cam1=a.mp4 --mount cam2=b.mp4 \
        [--user u --password p]

`--record name=out.mkv` adds a mount that accepts a pushed stream (RTSP ANNOUNCE/RECORD, as
FFmpeg's RTSP muxer sends it) and writes the received H.264 and AAC into a Matroska file.

Each client gets its own pipeline starting at the file's first frame (unshared media), so a
client's presentation times count from the start of the file: a test that knows the file's
ground truth can score detections by timestamp. An Annex-B `.h264` file plays in a loop, for
ever, with timestamps that keep counting (a camera); an .mp4/.mkv plays once. Runs under Debian's
python3 with python3-gi
(not a virtualenv). Prints `READY <port>` on stdout once it listens; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402 - after require_version


def pipeline_for(path: str) -> str:
    if path.endswith((".h264", ".264")):
        # an Annex-B elementary stream played in a loop: the file has no timestamps, so the parser
        # makes them from the frame rate in the stream (SPS timing info) and they keep counting
        # across loops, a camera that never ends
        return (
            f'( multifilesrc location="{path}" loop=true caps="video/x-h264,stream-format=byte-stream" '
            f"! h264parse name=loopparse config-interval=-1 ! video/x-h264,alignment=au "
            f"! rtph264pay name=pay0 pt=96 )"
        )
    demux = "qtdemux" if path.endswith((".mp4", ".mov")) else "matroskademux"
    return f'( filesrc location="{path}" ! {demux} ! h264parse config-interval=-1 ! rtph264pay name=pay0 pt=96 )'


def stamp_loop(factory: GstRtspServer.RTSPMediaFactory, media: GstRtspServer.RTSPMedia) -> None:
    """Give a looped elementary stream timestamps: frame n at n / fps, counting across loops.

    The raw file has none, and a camera's RTP timestamps keep increasing; the sinks then pace
    the stream at its frame rate (from the stream's SPS timing info, else 25 fps).
    """
    parse = media.get_element().get_by_name("loopparse")
    if parse is None:
        return
    count = [0]

    def probe(pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        buf = info.get_buffer()
        caps = pad.get_current_caps()
        num, den = 25, 1
        if caps is not None:
            ok, n, d = caps.get_structure(0).get_fraction("framerate")
            if ok and n > 0:
                num, den = n, d
        duration = Gst.util_uint64_scale(Gst.SECOND, den, num)
        buf.pts = buf.dts = count[0] * duration
        buf.duration = duration
        count[0] += 1
        return Gst.PadProbeReturn.OK

    parse.get_static_pad("src").add_probe(Gst.PadProbeType.BUFFER, probe)


def record_pipeline(path: str) -> str:
    """Receive H.264 (stream 0) and AAC (stream 1) and write them, unchanged, into Matroska."""
    return (
        f"( rtph264depay name=depay0 ! h264parse ! queue ! mux. "
        f"rtpmp4gdepay name=depay1 ! aacparse ! queue ! mux. "
        f"matroskamux name=mux streamable=true min-cluster-duration=0 max-cluster-duration=40000000 "
        f'! filesink location="{path}" )'
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--address", default="127.0.0.1")
    ap.add_argument("--mount", action="append", default=[], help="name=path of an H.264 mp4/mkv")
    ap.add_argument(
        "--record",
        action="append",
        default=[],
        help="name=path.mkv: a RECORD mount (ANNOUNCE/RECORD, e.g. FFmpeg pushing H.264 + AAC); "
        "what is received is written to the Matroska file",
    )
    ap.add_argument("--user")
    ap.add_argument("--password")
    args = ap.parse_args()

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address(args.address)
    server.set_service(str(args.port))
    mounts = server.get_mount_points()
    for spec in args.mount:
        name, _, path = spec.partition("=")
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(pipeline_for(path))
        factory.set_shared(False)
        factory.connect("media-configure", stamp_loop)
        if args.user:
            perms = GstRtspServer.RTSPPermissions()
            perms.add_permission_for_role("user", "media.factory.access", True)
            perms.add_permission_for_role("user", "media.factory.construct", True)
            factory.set_permissions(perms)
        mounts.add_factory("/" + name.strip("/"), factory)
    for spec in args.record:
        name, _, path = spec.partition("=")
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_transport_mode(GstRtspServer.RTSPTransportMode.RECORD)
        factory.set_latency(20)  # ms of jitter buffer: TCP needs little
        # on TEARDOWN send EOS through the pipeline and wait for it at the file: the jitter buffer and
        # queues drain into the muxer and the file is finalised, instead of being cut mid-stream
        factory.set_eos_shutdown(True)
        factory.set_launch(record_pipeline(path))
        factory.set_shared(False)
        mounts.add_factory("/" + name.strip("/"), factory)
    if args.user:
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string("media.factory.role", "user")
        basic = GstRtspServer.RTSPAuth.make_basic(args.user, args.password or "")
        auth.add_basic(basic, token)
        server.set_auth(auth)
    if server.attach(None) == 0:
        print(f"cannot listen on {args.address}:{args.port}", file=sys.stderr)
        return 1
    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    print(f"READY {server.get_bound_port()}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

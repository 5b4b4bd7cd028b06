#!/usr/bin/python3
# rtsp_server.py - a real RTSP camera for the e2e tests (GStreamer's gst-rtsp-server).
#
# Run it with Debian's python, /usr/bin/python3 (it has `gi`; a pyenv/venv python does not):
#
#   /usr/bin/python3 tests/e2e/rtsp_server.py --port 8554 [--path /cam] \
#       [--width 640 --height 480 --fps 15 --gop 15 --bitrate 1000 --profile high|main|baseline] \
#       [--audio pcmu|pcma|opus|none] [--protocols udp,tcp] \
#       [--user U --password P [--auth basic|digest]] \
#       [--backchannel pcmu|pcma --backchannel-out PATH]
#
#   stdout: exactly one line, once the socket is listening:  READY rtsp://127.0.0.1:PORT/cam
#   (--port 0 picks a free port; READY then carries the real one).
#
# Media: H.264 (x264enc, zerolatency/ultrafast, threads=1 so one slice per frame, one IDR
# every --gop frames, default = fps, SPS/PPS in-band before every IDR; RTP pt 96) from
# videotestsrc pattern=ball. --profile high|main|baseline gives SDP profile-level-id
# 640016|4d4016|42c016 at 640x480@15 (level 2.2; 1280x720@30 is level 3.1). Audio: a 440 Hz
# sine as PCMU (pt 0, 8 kHz mono, 20 ms packets), PCMA (pt 8) or Opus (pt 97, 48 kHz
# stereo), or none. The media factory is shared: all clients of the mount see the same
# pipeline (started by the first client, stopped when the last one leaves).
# It listens on 127.0.0.1 only; RTP/RTCP UDP sockets are bound to 127.0.0.1 too.
# --protocols: lower transports allowed in SETUP (a disallowed one gets 461).
# --user/--password: every request on the mount needs credentials (401 otherwise), Basic or
# (--auth digest) Digest, never both (a Basic header on a digest server gets 401).
# Start-up to READY: ~60-120 ms; the pipeline is built at the first DESCRIBE (answers in ~10-20 ms).
# --backchannel pcmu|pcma: an ONVIF camera with a speaker (RTSPOnvifServer and
# RTSPOnvifMediaFactory): a client that sends `Require: www.onvif.org/ver20/backchannel` gets
# a third, sendonly audio stream in DESCRIBE (PCMU pt 0 or PCMA pt 8, 8 kHz), the "camera's
# speaker". What it receives is depayloaded, decoded and appended to --backchannel-out as raw
# signed 16-bit little-endian mono PCM at 8 kHz (no header; the file is created at start, so
# an empty file means nothing was heard). Media is then not shared between clients (each
# client gets its own pipeline, as gst-rtsp-server's ONVIF examples do), and the camera's
# own sources sit behind `tee allow-not-linked=true`: a speaker-only client leaves them
# unlinked, which would otherwise error its media (speaker included) by a race.
# SIGTERM/SIGINT: exit 0 at once. Errors (port in use, missing GStreamer element, bad
# arguments): a message on stderr, exit 1 (2 for argument errors).
# The listening socket has SO_REUSEADDR (gst-rtsp-server binds with allow_reuse), so a
# server killed with SIGKILL can be restarted on the same port immediately.
#
# Debian 12 packages (GStreamer 1.22): python3-gi gir1.2-gst-rtsp-server-1.0 (pulls
# libgstrtspserver-1.0-0, gir1.2-gstreamer-1.0, gir1.2-gst-plugins-base-1.0 for GstRtsp)
# gstreamer1.0-plugins-base (videotestsrc, audiotestsrc, audioconvert, audioresample, opus)
# gstreamer1.0-plugins-good (rtp payloaders, rtpbin, udp, mulaw, alaw)
# gstreamer1.0-plugins-ugly (x264enc). plugins-bad is not needed.
#
# Client check:  ffprobe -rtsp_transport tcp -v error -show_streams rtsp://127.0.0.1:8554/cam

import argparse
import os
import signal
import sys

try:
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtsp", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtsp, GstRtspServer
except (ImportError, ValueError) as e:
    sys.stderr.write(
        "rtsp_server: cannot import GStreamer bindings (%s); run with /usr/bin/python3 and "
        "install python3-gi gir1.2-gst-rtsp-server-1.0\n" % e
    )
    sys.exit(1)

HOST = "127.0.0.1"

# --profile -> (caps profile, x264enc tool switches). x264 treats the profile as a ceiling and
# writes the lowest profile_idc the tools in use need; speed-preset=ultrafast turns CABAC and
# the 8x8 transform off, which alone would give Constrained Baseline whatever the caps say. So
# the tools are switched on explicitly (explicit properties override the preset).
PROFILES = {
    "high": ("high", "cabac=true dct8x8=true"),
    "main": ("main", "cabac=true dct8x8=false"),
    "baseline": ("constrained-baseline", "cabac=false dct8x8=false"),
}

# audio mode -> (launch fragment, elements it needs)
AUDIO = {
    "pcmu": (
        "audiotestsrc is-live=true wave=sine freq=440 samplesperbuffer=160 ! audioconvert ! "
        "audioresample ! audio/x-raw,rate=8000,channels=1 ! mulawenc ! "
        "rtppcmupay name=pay1 pt=0",
        ["audiotestsrc", "audioconvert", "audioresample", "mulawenc", "rtppcmupay"],
    ),
    "pcma": (
        "audiotestsrc is-live=true wave=sine freq=440 samplesperbuffer=160 ! audioconvert ! "
        "audioresample ! audio/x-raw,rate=8000,channels=1 ! alawenc ! "
        "rtppcmapay name=pay1 pt=8",
        ["audiotestsrc", "audioconvert", "audioresample", "alawenc", "rtppcmapay"],
    ),
    "opus": (
        "audiotestsrc is-live=true wave=sine freq=440 samplesperbuffer=960 ! audioconvert ! "
        "audioresample ! audio/x-raw,rate=48000,channels=2 ! opusenc frame-size=20 ! "
        "rtpopuspay name=pay1 pt=97",
        ["audiotestsrc", "audioconvert", "audioresample", "opusenc", "rtpopuspay"],
    ),
    "none": ("", []),
}

# --backchannel -> (caps encoding name, payload type, depayloader, decoder)
BACKCHANNEL = {
    "pcmu": ("PCMU", 0, "rtppcmudepay", "mulawdec"),
    "pcma": ("PCMA", 8, "rtppcmadepay", "alawdec"),
}


def backchannel_launch(a):
    name, pt, depay, dec = BACKCHANNEL[a.backchannel]
    # gst-rtsp-server feeds the client's RTP into the element named depay_backchannel.
    return (
        '( capsfilter caps="application/x-rtp,media=audio,payload={pt},clock-rate=8000,'
        'encoding-name={name}" name=depay_backchannel ! {depay} ! {dec} ! '
        "audio/x-raw,format=S16LE,rate=8000,channels=1 ! "
        "filesink location={out} append=true buffer-mode=unbuffered sync=false async=false )"
    ).format(pt=pt, name=name, depay=depay, dec=dec, out=a.backchannel_out)


def die(msg, code=1):
    sys.stderr.write("rtsp_server: %s\n" % msg)
    sys.stderr.flush()
    os._exit(code)


def parse_args():
    p = argparse.ArgumentParser(description="RTSP test camera (gst-rtsp-server) on 127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1 (0 = pick one)")
    p.add_argument("--path", default="/cam", help="mount point (default /cam)")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--fps", type=int, default=15)
    p.add_argument("--gop", type=int, default=None, help="keyframe interval in frames (default = fps)")
    p.add_argument("--bitrate", type=int, default=1000, help="x264 bitrate, kbit/s (default 1000)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="high")
    p.add_argument("--audio", choices=["none", "pcmu", "pcma", "opus"], default="pcmu")
    p.add_argument("--protocols", default="udp,tcp", help="allowed lower transports: udp,tcp (default both)")
    p.add_argument("--user")
    p.add_argument("--password")
    p.add_argument("--auth", choices=["basic", "digest"], default="basic")
    p.add_argument("--backchannel", choices=sorted(BACKCHANNEL), default=None,
                   help="ONVIF audio backchannel (the camera's speaker) in this codec")
    p.add_argument("--backchannel-out", default=None,
                   help="raw s16le 8 kHz mono file the backchannel audio is appended to")
    a = p.parse_args()
    if (a.backchannel is None) != (a.backchannel_out is None):
        p.error("--backchannel and --backchannel-out go together")
    if not 0 <= a.port <= 65535:
        p.error("--port must be 0..65535")
    if not a.path.startswith("/") or a.path == "/":
        p.error("--path must look like /cam")
    for name in ("width", "height", "fps", "bitrate"):
        if getattr(a, name) <= 0:
            p.error("--%s must be > 0" % name)
    if a.gop is None:
        a.gop = a.fps
    if a.gop <= 0:
        p.error("--gop must be > 0")
    if (a.user is None) != (a.password is None):
        p.error("--user and --password go together")
    protos = [x.strip().lower() for x in a.protocols.split(",") if x.strip()]
    if not protos or any(x not in ("udp", "tcp") for x in protos):
        p.error("--protocols: a comma list of udp, tcp")
    a.protocols = protos
    return a


def launch_string(a):
    video = (
        "videotestsrc is-live=true pattern=ball ! "
        "video/x-raw,width={w},height={h},framerate={f}/1 ! "
        "x264enc tune=zerolatency speed-preset=ultrafast threads=1 key-int-max={g} bitrate={b} {t} ! "
        "video/x-h264,profile={p} ! "
        "rtph264pay name=pay0 pt=96 config-interval=-1"
    ).format(w=a.width, h=a.height, f=a.fps, g=a.gop, b=a.bitrate,
               p=PROFILES[a.profile][0], t=PROFILES[a.profile][1])
    audio = AUDIO[a.audio][0]
    if a.backchannel is not None:
        # A backchannel client sets up only the speaker's stream; the camera's own streams
        # then have no receiver in its (unshared) media, and a source whose data is not
        # linked errors the whole media, speaker included, depending on timing. A tee that
        # allows not-linked keeps such sources quiet.
        quiet = " ! tee allow-not-linked=true ! "
        video = video.replace(" ! ", quiet, 1)
        audio = audio.replace(" ! ", quiet, 1)
    return "( " + video + (" " + audio if audio else "") + " )"


def check_elements(a):
    needed = ["videotestsrc", "x264enc", "rtph264pay"] + AUDIO[a.audio][1]
    if a.backchannel is not None:
        needed += list(BACKCHANNEL[a.backchannel][2:]) + ["capsfilter", "filesink", "tee"]
    missing = [e for e in needed if Gst.ElementFactory.find(e) is None]
    if missing:
        die(
            "missing GStreamer element(s): %s (packages: gstreamer1.0-plugins-base, "
            "gstreamer1.0-plugins-good, gstreamer1.0-plugins-ugly)" % ", ".join(missing)
        )


def main():
    a = parse_args()
    Gst.init(None)
    check_elements(a)
    launch = launch_string(a)
    try:  # syntax check now rather than at the first DESCRIBE
        Gst.parse_launch(launch)
    except GLib.Error as e:
        die("bad pipeline %r: %s" % (launch, e.message))

    if a.backchannel is not None:
        try:
            open(a.backchannel_out, "wb").close()
        except OSError as e:
            die("cannot create --backchannel-out %s: %s" % (a.backchannel_out, e))
        server = GstRtspServer.RTSPOnvifServer()
        factory = GstRtspServer.RTSPOnvifMediaFactory()
        factory.set_backchannel_launch(backchannel_launch(a))
        factory.set_media_gtype(GstRtspServer.RTSPOnvifMedia)
        factory.set_shared(False)
    else:
        server = GstRtspServer.RTSPServer()
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_shared(True)
    server.set_address(HOST)
    server.set_service(str(a.port))
    factory.set_launch(launch)
    lower = GstRtsp.RTSPLowerTrans(0)
    if "udp" in a.protocols:
        lower |= GstRtsp.RTSPLowerTrans.UDP
    if "tcp" in a.protocols:
        lower |= GstRtsp.RTSPLowerTrans.TCP
    factory.set_protocols(lower)
    # RTP/RTCP UDP ports: without an address pool the server binds them to 0.0.0.0.
    pool = GstRtspServer.RTSPAddressPool()
    if not pool.add_range(HOST, HOST, 20000, 60000, 0):
        die("cannot set up the UDP address pool")
    factory.set_address_pool(pool)

    if a.user is not None:
        role = "user"
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, role)
        if a.auth == "digest":
            auth.add_digest(a.user, a.password, token)
            auth.set_supported_methods(GstRtsp.RTSPAuthMethod.DIGEST)
        else:
            auth.add_basic(GstRtspServer.RTSPAuth.make_basic(a.user, a.password), token)
            auth.set_supported_methods(GstRtsp.RTSPAuthMethod.BASIC)
        auth.set_realm("call-assist-e2e")
        server.set_auth(auth)
        perms = GstRtspServer.RTSPPermissions()
        perms.add_permission_for_role(role, GstRtspServer.RTSP_PERM_MEDIA_FACTORY_ACCESS, True)
        perms.add_permission_for_role(role, GstRtspServer.RTSP_PERM_MEDIA_FACTORY_CONSTRUCT, True)
        factory.set_permissions(perms)

    server.get_mount_points().add_factory(a.path, factory)

    loop = GLib.MainLoop()
    try:
        # create_source() creates, binds and listens; it raises on "address in use" etc.,
        # where attach() would only return 0.
        source = server.create_source(None)
    except GLib.Error as e:
        die("cannot listen on %s:%d: %s" % (HOST, a.port, e.message))
    source.attach(None)
    port = server.get_bound_port()

    def stop(*_):
        sys.stdout.flush()
        os._exit(0)  # prompt: no pipeline teardown, nothing to keep

    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, sig, stop)

    sys.stdout.write("READY rtsp://%s:%d%s\n" % (HOST, port, a.path))
    sys.stdout.flush()
    loop.run()


if __name__ == "__main__":
    main()

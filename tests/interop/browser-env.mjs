// The browser surface that matrix-js-sdk's legacy 1:1 VoIP (MatrixCall) needs, built on
// @roamhq/wrtc, plus the loopback-only guards. Import this, call installBrowserGlobals(),
// and only then import matrix-js-sdk (it decides at createClient() whether calls work).

import os from "node:os";
import process from "node:process";
import wrtc from "@roamhq/wrtc";

const { RTCAudioSource, RTCVideoSource } = wrtc.nonstandard;

// ---------------------------------------------------------------- loopback guards

export const isLoopbackAddr = (a) =>
    typeof a === "string" &&
    (a.startsWith("127.") || a === "::1" || a === "0:0:0:0:0:0:0:1" || a === "localhost");

/** "name address" for every interface address that is not loopback. */
export function nonLoopbackAddresses() {
    const found = [];
    for (const [name, addrs] of Object.entries(os.networkInterfaces())) {
        for (const a of addrs ?? []) {
            if (!a.internal && !isLoopbackAddr(a.address)) found.push(`${name} ${a.address}`);
        }
    }
    return found;
}

export const stats = { droppedCandidates: 0 };
let log = () => {};

// "candidate:<foundation> <component> <transport> <priority> <address> <port> typ ..."
export const candidateAddress = (line) => line.replace(/^a=/, "").trim().split(/\s+/)[4];
/** Empty candidate (end-of-candidates) is kept; otherwise only loopback addresses. */
export const keepCandidate = (line) => !line || isLoopbackAddr(candidateAddress(line));

export function filterSdp(sdp) {
    if (typeof sdp !== "string") return sdp;
    const eol = sdp.includes("\r\n") ? "\r\n" : "\n";
    return sdp
        .split(eol)
        .filter((l) => {
            if (!l.startsWith("a=candidate:") || keepCandidate(l)) return true;
            stats.droppedCandidates++;
            log(`dropping SDP candidate ${l}`);
            return false;
        })
        .join(eol);
}

/**
 * The SDP with only `codec` (an rtpmap encoding name, any case) left in its audio sections:
 * the m= line's payload types and their rtpmap/fmtp/rtcp-fb lines (RED, CN, telephone-event
 * and the other codecs go). Other sections are kept as they are.
 */
export function onlyAudioCodec(sdp, codec) {
    if (typeof sdp !== "string" || !codec) return sdp;
    const eol = sdp.includes("\r\n") ? "\r\n" : "\n";
    const want = codec.toLowerCase();
    const sections = [[]];
    for (const l of sdp.split(eol)) {
        if (l.startsWith("m=")) sections.push([]);
        sections[sections.length - 1].push(l);
    }
    return sections
        .flatMap((lines) => {
            if (!lines[0]?.startsWith("m=audio ")) return lines;
            const keep = new Set(
                lines
                    .map((l) => /^a=rtpmap:(\d+) ([^/]+)\//.exec(l))
                    .filter((m) => m && m[2].toLowerCase() === want)
                    .map((m) => m[1]),
            );
            const [m, port, proto, ...pts] = lines[0].split(" ");
            const head = [m, port, proto, ...pts.filter((pt) => keep.has(pt))].join(" ");
            const rest = lines.slice(1).filter((l) => {
                const pt = /^a=(?:rtpmap|fmtp|rtcp-fb):(\d+)/.exec(l)?.[1];
                return pt === undefined || keep.has(pt);
            });
            return [head, ...rest];
        })
        .join(eol);
}

/** The audio codec the peer restricts its offers and answers to (`--audio-codec`), if any. */
let audioCodec = null;
export function restrictAudioCodec(codec) {
    audioCodec = codec || null;
}
const restrictDescription = (d) =>
    audioCodec && d && typeof d.sdp === "string" ? { type: d.type, sdp: onlyAudioCodec(d.sdp, audioCodec) } : d;

const filterDescription = (d) => (d && typeof d.sdp === "string" ? { ...d, sdp: filterSdp(d.sdp) } : d);

/**
 * Outbound filter for m.call.* event contents: the SDP in invite/answer/negotiate and the
 * trickled candidates lose every non-loopback candidate. Returns a new content object.
 */
export function filterCallContent(eventType, content) {
    if (!content || typeof eventType !== "string" || !eventType.startsWith("m.call.")) return content;
    const out = { ...content };
    for (const key of ["offer", "answer", "description"]) {
        if (out[key]) out[key] = filterDescription(out[key]);
    }
    if (Array.isArray(out.candidates)) {
        out.candidates = out.candidates.filter((c) => {
            if (keepCandidate(c?.candidate)) return true;
            stats.droppedCandidates++;
            log(`dropping local candidate ${c.candidate}`);
            return false;
        });
    }
    return out;
}

/** Wrap client.sendEvent so no m.call.* event carries a non-loopback candidate. */
export function guardCallEvents(client) {
    const send = client.sendEvent.bind(client);
    client.sendEvent = (roomId, ...rest) => {
        // sendEvent(roomId, eventType, content, txnId?) or (roomId, threadId, eventType, content, txnId?)
        const i = typeof rest[1] === "string" || rest[1] === null ? 1 : 0;
        rest[i + 1] = filterCallContent(rest[i], rest[i + 1]);
        return send(roomId, ...rest);
    };
}

export function iceServerIsLoopback(server) {
    const urls = Array.isArray(server?.urls) ? server.urls : [server?.urls ?? server?.url];
    return urls.every((u) => {
        // turn:host:port?transport=udp, stun:[::1]:3478, turns:host
        const m = /^(?:stuns?|turns?):(\[[^\]]+\]|[^:?]+)/.exec(String(u));
        return !!m && isLoopbackAddr(m[1].replace(/^\[|\]$/g, ""));
    });
}

/**
 * wrtc's RTCPeerConnection with a second guard on top of the network namespace: only
 * loopback ICE servers are used, and remote candidates (trickled or inside SDP) that are
 * not loopback are dropped before libwebrtc sees them. Outbound candidates are filtered by
 * guardCallEvents() (wrtc's localDescription is a non-configurable own property).
 */
export class LoopbackRTCPeerConnection extends wrtc.RTCPeerConnection {
    constructor(config = {}) {
        const iceServers = (config.iceServers ?? []).filter((s) => {
            const ok = iceServerIsLoopback(s);
            if (!ok) log(`dropping non-loopback ICE server ${JSON.stringify(s.urls ?? s.url)}`);
            return ok;
        });
        super({ ...config, iceServers });
    }

    // --audio-codec: what libwebrtc sets locally (and the SDP the other side gets) names only
    // that audio codec, so the other side must send it.
    async createOffer(...a) {
        return restrictDescription(await super.createOffer(...a));
    }

    async createAnswer(...a) {
        return restrictDescription(await super.createAnswer(...a));
    }

    setRemoteDescription(desc, ...rest) {
        return super.setRemoteDescription(filterDescription(desc), ...rest);
    }

    addIceCandidate(candidate, ...rest) {
        const line = candidate?.candidate;
        if (line && !keepCandidate(line)) {
            stats.droppedCandidates++;
            log(`dropping remote candidate ${line}`);
            return Promise.resolve();
        }
        return super.addIceCandidate(candidate, ...rest);
    }
}

// ---------------------------------------------------------------- synthetic media

export const AUDIO_RATE = 48000;
const AUDIO_CHUNK = AUDIO_RATE / 100; // 10 ms
export const WIDTH = 320;
export const HEIGHT = 240;
export const FPS = 15;
const timers = new Set();

/** Stops every synthetic source's timer (call before exiting). */
export function stopSyntheticMedia() {
    for (const t of timers) clearInterval(t);
    timers.clear();
}

function every(ms, track, fn) {
    const timer = setInterval(() => {
        if (track.readyState === "ended") {
            clearInterval(timer);
            timers.delete(timer);
            return;
        }
        fn();
    }, ms);
    timers.add(timer);
}

/**
 * 440 Hz sine, 48 kHz mono s16, fed 10 ms at a time: as many chunks as the wall clock says
 * are due (Node's setInterval runs late, so one chunk per tick would send a few percent
 * less than 48 000 samples a second, a clock drift no real microphone has).
 */
/** --audio-pulse: the sine sounds only in the first PULSE_MS of each wall-clock second. */
const PULSE_MS = 200;
let audioPulse = false;
export function setAudioPulse(on) {
    audioPulse = !!on;
}

export function syntheticAudioTrack() {
    const source = new RTCAudioSource();
    const track = source.createTrack();
    let phase = 0;
    const step = (2 * Math.PI * 440) / AUDIO_RATE;
    const start = performance.now();
    // Wall-clock ms of the first sample: a sample's own time is this plus its index / 48.
    const startEpoch = performance.timeOrigin + start;
    let sent = 0;
    every(10, track, () => {
        const due = Math.floor((performance.now() - start) / 10) + 1;
        // After a long stall, skip ahead rather than flood (at most 50 ms at once).
        if (due - sent > 5) sent = due - 5;
        for (; sent < due; sent++) sendChunk();
    });
    function sendChunk() {
        const samples = new Int16Array(AUDIO_CHUNK);
        for (let i = 0; i < AUDIO_CHUNK; i++) {
            const at = startEpoch + (sent * AUDIO_CHUNK + i) / (AUDIO_RATE / 1000);
            const on = !audioPulse || at % 1000 < PULSE_MS;
            samples[i] = on ? Math.round(Math.sin(phase) * 8000) : 0;
            phase += step;
        }
        phase %= 2 * Math.PI;
        source.onData({
            samples,
            sampleRate: AUDIO_RATE,
            bitsPerSample: 16,
            channelCount: 1,
            numberOfFrames: AUDIO_CHUNK,
        });
    }
    return track;
}

/** 320x240 I420 at 15 fps: a diagonal gradient that moves every frame. */
export function syntheticVideoTrack() {
    const source = new RTCVideoSource();
    const track = source.createTrack();
    const ySize = WIDTH * HEIGHT;
    let n = 0;
    every(1000 / FPS, track, () => {
        const data = new Uint8ClampedArray(ySize * 1.5); // Y, then U and V at quarter size
        for (let y = 0; y < HEIGHT; y++) {
            for (let x = 0; x < WIDTH; x++) data[y * WIDTH + x] = (x + y + n * 4) & 0xff;
        }
        data.fill(128, ySize);
        source.onFrame({ width: WIDTH, height: HEIGHT, data });
        n++;
    });
    return track;
}

// ---------------------------------------------------------------- globals

const noop = () => {};

const DEVICES = [
    { kind: "audioinput", deviceId: "synthetic-audio", groupId: "synthetic", label: "Synthetic sine 440 Hz" },
    { kind: "videoinput", deviceId: "synthetic-video", groupId: "synthetic", label: "Synthetic 320x240@15" },
    { kind: "audiooutput", deviceId: "default", groupId: "synthetic", label: "Nowhere" },
];

export const mediaDevices = {
    async enumerateDevices() {
        return DEVICES.map((d) => ({ ...d, toJSON: () => d }));
    },
    async getUserMedia(constraints = {}) {
        const tracks = [];
        if (constraints.audio) tracks.push(syntheticAudioTrack());
        if (constraints.video) tracks.push(syntheticVideoTrack());
        if (tracks.length === 0) throw new TypeError("getUserMedia: no audio or video requested");
        log(`getUserMedia(${JSON.stringify(constraints)}) -> ${tracks.map((t) => t.kind).join("+")}`);
        return new wrtc.MediaStream(tracks);
    },
    async getDisplayMedia() {
        throw Object.assign(new Error("no screen sharing here"), { name: "NotAllowedError" });
    },
    getSupportedConstraints() {
        return { deviceId: true, width: true, height: true, frameRate: true };
    },
    addEventListener: noop,
    removeEventListener: noop,
};

// CallFeed measures speaking volume through Web Audio for every feed with an audio track;
// a stand-in whose analyser always reads silence (-Infinity dB) is enough.
class SilentAudioContext {
    constructor() {
        this.state = "running";
        this.sampleRate = AUDIO_RATE;
    }
    createAnalyser() {
        return {
            fftSize: 512,
            smoothingTimeConstant: 0.1,
            get frequencyBinCount() {
                return this.fftSize / 2;
            },
            getFloatFrequencyData: (arr) => arr.fill(-Infinity),
            connect: noop,
            disconnect: noop,
        };
    }
    createMediaStreamSource() {
        return { connect: noop, disconnect: noop };
    }
    async close() {
        this.state = "closed";
    }
    async resume() {}
}

/**
 * Make Node look enough like a browser for matrix-js-sdk's MatrixCall:
 * - window (= globalThis) and a document stub: supportsMatrixCall() checks both exist;
 * - window.RTCPeerConnection (loopback-guarded), RTCSessionDescription, RTCIceCandidate,
 *   RTCRtpSender/Receiver/Transceiver (bare RTCRtpReceiver.getCapabilities is used for
 *   codec preferences), MediaStream, MediaStreamTrack from @roamhq/wrtc;
 * - navigator.mediaDevices: enumerateDevices lists one synthetic mic and camera,
 *   getUserMedia returns wrtc RTCAudioSource/RTCVideoSource tracks fed by timers;
 * - AudioContext: silent stand-in for CallFeed's volume meter.
 */
export function installBrowserGlobals({ progress } = {}) {
    if (progress) log = progress;
    Object.assign(globalThis, {
        RTCPeerConnection: LoopbackRTCPeerConnection,
        RTCSessionDescription: wrtc.RTCSessionDescription,
        RTCIceCandidate: wrtc.RTCIceCandidate,
        RTCRtpSender: wrtc.RTCRtpSender,
        RTCRtpReceiver: wrtc.RTCRtpReceiver,
        RTCRtpTransceiver: wrtc.RTCRtpTransceiver,
        RTCDataChannel: wrtc.RTCDataChannel,
        MediaStream: wrtc.MediaStream,
        MediaStreamTrack: wrtc.MediaStreamTrack,
        AudioContext: SilentAudioContext,
    });
    // Node 20 has no `navigator`; Node >= 21 has a read-only one: define over it either way.
    Object.defineProperty(globalThis, "navigator", {
        configurable: true,
        writable: true,
        value: { userAgent: `Node.js/${process.version} (call-assist interop peer)`, mediaDevices },
    });
    globalThis.window = globalThis;
    globalThis.addEventListener ??= noop; // sync.js: window "online" listener
    globalThis.removeEventListener ??= noop;
    globalThis.document = {
        visibilityState: "visible",
        hidden: false,
        addEventListener: noop,
        removeEventListener: noop,
        createElement: () => ({ style: {}, play: async () => {}, pause: noop, setAttribute: noop }),
    };
}

// The page browser-peer.mjs opens in Chromium: matrix-js-sdk's MatrixCall with the browser's
// own WebRTC (RTCDTMFSender included), as Element Web runs it. It reads its settings (the
// password too, so it never reaches a command line) from the driver's /config, logs through
// /log and ends by posting one result to /result. Bundled by esbuild at run time.
import * as sdk from "matrix-js-sdk";
import { logger } from "matrix-js-sdk/lib/logger.js";
import { CallEvent, CallState, CallErrorCode } from "matrix-js-sdk/lib/webrtc/call.js";
import { CallEventHandlerEvent } from "matrix-js-sdk/lib/webrtc/callEventHandler.js";
import { pressDigits, recordCall, summarizeStats } from "../call-common.mjs";

const T0 = performance.now();
const ms = () => Math.round(performance.now() - T0);
const post = (path, body) =>
    fetch(path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
const progress = (line) => void post("/log", { line: `+${(ms() / 1000).toFixed(2)}s ${line}` }).catch(() => {});
for (const level of ["log", "info", "debug", "trace", "warn", "error"]) {
    const orig = console[level].bind(console);
    console[level] = (...a) => {
        orig(...a);
        if (level === "warn" || level === "error") progress(`${level}: ${a.map(String).join(" ")}`);
    };
}

// What ICE gathered and how it went: the first thing to read when a call does not connect.
const NativePC = window.RTCPeerConnection;
window.RTCPeerConnection = class extends NativePC {
    constructor(...a) {
        super(...a);
        this.addEventListener("icecandidate", (e) => progress(`local candidate: ${e.candidate?.candidate || "(end)"}`));
        this.addEventListener("iceconnectionstatechange", () => progress(`ice ${this.iceConnectionState}`));
    }
};
const cfg = await (await fetch("/config")).json();
logger.setLevel(cfg.verbose ? "debug" : "warn");

const result = {
    role: cfg.call ? "caller" : "callee",
    user_id: cfg.user,
    user_agent: navigator.userAgent,
    connected: false,
    call_id: null,
    state: null,
    hangup_reason: null,
    hangup_party: null,
    timings_ms: {},
    rtp: null,
    selected_pair: null,
    telephone_event: null,
    dtmf: null,
    e2ee: cfg.e2ee,
    room_encrypted: null,
    decryption_failures: 0,
    error: null,
};
const mark = (name) => {
    result.timings_ms[name] ??= ms();
};

let client;
let activeCall = null;
let finished = false;
let statsTimer = null;

async function snapshotStats(pc) {
    if (!pc || pc.connectionState === "closed") return;
    try {
        // Read here, not at "connected": a caller's ICE can connect before its answer is set.
        result.telephone_event = /a=rtpmap:\d+ telephone-event\//.test(pc.remoteDescription?.sdp ?? "");
        const { rtp, selectedPair } = summarizeStats(await pc.getStats());
        result.rtp = rtp;
        if (selectedPair) result.selected_pair = selectedPair;
    } catch {
        /* closed meanwhile */
    }
}

// Presses cfg.dtmf as a user on Element's dial pad does (MatrixCall.sendDtmfDigit, which
// hands each digit to the audio sender's RTCDTMFSender) and records what Chromium's sender
// really played (its tonechange events).
function pressDialPad(call) {
    const sender = call.peerConn?.getSenders().find((s) => s.track?.kind === "audio");
    const dtmf = pressDigits(call, cfg.dtmf, progress);
    dtmf.can_insert_dtmf = sender?.dtmf?.canInsertDTMF ?? false;
    dtmf.tone_change = "";
    sender?.dtmf?.addEventListener("tonechange", (e) => {
        if (e.tone) dtmf.tone_change += e.tone;
    });
    result.dtmf = dtmf;
}

function finish(error) {
    if (finished) return;
    finished = true;
    if (error && !result.error) result.error = String(error);
    clearInterval(statsTimer);
    if (activeCall) {
        result.call_id = activeCall.callId;
        result.remote_feeds = remoteFeeds;
        result.room_encrypted = client?.isRoomEncrypted?.(activeCall.roomId) ?? null;
        result.state = activeCall.state;
        result.hangup_reason ??= activeCall.hangupReason ?? null;
        result.hangup_party ??= activeCall.hangupParty ?? null;
    }
    result.timings_ms.total = ms();
    try {
        client?.stopClient();
    } catch {
        /* ending anyway */
    }
    void post("/result", result);
}

// What matrix-js-sdk made of the other side's streams (Element shows these and only these).
let remoteFeeds = [];

// Remote media goes to elements, as in Element: Chromium then decodes and plays it.
function play(call) {
    const feeds = call.getRemoteFeeds();
    if (feeds.length > 0) {
        remoteFeeds = feeds.map((f) => ({
            purpose: f.purpose,
            audio_tracks: f.stream.getAudioTracks().length,
            video_tracks: f.stream.getVideoTracks().length,
        }));
    }
    for (const feed of feeds) {
        const id = `feed-${feed.stream.id}`;
        if (document.getElementById(id)) continue;
        const el = document.createElement(feed.stream.getVideoTracks().length ? "video" : "audio");
        el.id = id;
        el.autoplay = true;
        el.srcObject = feed.stream;
        // The first remote frame Chromium decoded and presented (what a user first sees).
        if (el.tagName === "VIDEO") el.requestVideoFrameCallback(() => mark("first_video_frame"));
        document.body.append(el);
        progress(`playing remote ${feed.purpose} in <${el.tagName.toLowerCase()}> (${feed.stream.getTracks().map((t) => t.kind).join("+")})`);
        void el.play().catch((e) => progress(`play(): ${e.message}`));
    }
}

function watchCall(call) {
    activeCall = call;
    recordCall(call, result, progress, CallEvent.Error);
    call.on(CallEvent.FeedsChanged, () => play(call));
    call.on(CallEvent.State, (state, old) => {
        progress(`state ${old} -> ${state}`);
        mark(`state_${state}`);
        if (state === CallState.Connected && !result.connected) {
            result.connected = true;
            mark("connected");
            play(call);
            statsTimer = setInterval(() => void snapshotStats(call.peerConn), 1000);
            if (cfg.dtmf) setTimeout(() => pressDialPad(call), cfg.dtmf_after_ms);
            setTimeout(async () => {
                await snapshotStats(call.peerConn);
                if (cfg.call) {
                    progress("duration elapsed; hanging up");
                    call.hangup(CallErrorCode.UserHangup, false);
                    setTimeout(() => finish(null), 1000);
                } else {
                    progress("duration elapsed; waiting for the remote hangup");
                }
            }, cfg.duration_ms);
        }
        if (state === CallState.Ended) setTimeout(() => finish(null), 200);
    });
    call.on(CallEvent.Hangup, async () => {
        progress(`call ended: reason=${call.hangupReason} party=${call.hangupParty}`);
        await snapshotStats(call.peerConn);
        finish(null);
    });
}

async function main() {
    setTimeout(() => {
        progress(`max wait of ${cfg.max_wait_ms / 1000} s reached`);
        if (activeCall && !activeCall.callHasEnded()) activeCall.hangup(CallErrorCode.UserHangup, false);
        finish(activeCall ? "max wait reached" : "timed out waiting for a call");
    }, cfg.max_wait_ms);
    const login = await sdk.createClient({ baseUrl: cfg.homeserver }).loginRequest({
        type: "m.login.password",
        identifier: { type: "m.id.user", user: cfg.user },
        password: cfg.password,
        initial_device_display_name: "interop browser peer",
    });
    mark("logged_in");
    progress(`logged in as ${login.user_id} device ${login.device_id}`);
    client = sdk.createClient({
        baseUrl: cfg.homeserver,
        userId: login.user_id,
        accessToken: login.access_token,
        deviceId: login.device_id,
        fallbackICEServerAllowed: false,
        timelineSupport: false,
    });
    if (!client.callEventHandler) throw new Error("matrix-js-sdk says this browser cannot make calls");
    if (cfg.raw_audio) {
        // Element's "voice processing" settings off: noise suppression and gain control
        // would treat a steady test tone as noise.
        await client.getMediaHandler().setAudioSettings({
            autoGainControl: false,
            echoCancellation: false,
            noiseSuppression: false,
        });
    }
    if (cfg.e2ee) {
        // As Element Web: the Rust crypto (matrix-sdk-crypto-wasm), here with an in-memory
        // store, so every run is a new device.
        await client.initRustCrypto({ useIndexedDB: false });
        mark("crypto_ready");
        progress(`Rust crypto ready (device ${login.device_id})`);
        client.on(sdk.MatrixEventEvent.Decrypted, (ev) => {
            if (ev.isDecryptionFailure() && !String(ev.decryptionFailureReason ?? "").startsWith("HISTORICAL")) {
                result.decryption_failures += 1;
                progress(`cannot decrypt ${ev.getId()}: ${ev.decryptionFailureReason ?? "?"}`);
            }
        });
    }
    const prepared = new Promise((resolve) =>
        client.on(sdk.ClientEvent.Sync, (state) => state === "PREPARED" && resolve()),
    );
    if (!cfg.call) {
        client.on(CallEventHandlerEvent.Incoming, (call) => {
            if (activeCall) return void call.reject();
            mark("incoming");
            progress(`incoming ${call.type} call ${call.callId}`);
            watchCall(call);
            void call.answer().catch((e) => finish(`answer failed: ${e.message}`));
        });
    }
    await client.startClient({ initialSyncLimit: 1, lazyLoadMembers: false });
    await prepared;
    mark("prepared");
    progress("sync prepared");
    if (cfg.call) {
        const call = sdk.createNewMatrixCall(client, cfg.call);
        if (!call) throw new Error("createNewMatrixCall returned null");
        watchCall(call);
        mark("placing");
        await (cfg.voice ? call.placeVoiceCall() : call.placeVideoCall());
    } else {
        progress("waiting for an incoming call");
    }
}

window.addEventListener("unhandledrejection", (e) => progress(`unhandled rejection: ${e.reason?.stack ?? e.reason}`));
main().catch((e) => {
    progress(`failed: ${e?.stack ?? e}`);
    finish(e?.message ?? e);
});

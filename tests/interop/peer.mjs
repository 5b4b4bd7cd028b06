#!/usr/bin/env node
// The reference peer for call-assist's e2e tests: matrix-js-sdk's MatrixCall (legacy 1:1
// VoIP, m.call.* version "1") running in Node, with @roamhq/wrtc as WebRTC and synthetic
// media (440 Hz sine audio, moving-gradient 320x240 video at 15 fps).
//
//   node peer.mjs --homeserver URL --user @u:server --password PW (--call ROOM_ID | --answer)
//                 [--duration-s 5] [--max-wait-s 60] [--voice] [--require audio,video]
//                 [--e2ee [--only-signed-devices]] [--join-invites] [--dtmf DIGITS]
//                 [--dtmf-after-s 1] [--audio-codec opus] [--audio-pulse]
//                 [--allow-non-loopback] [--verbose]
//
// --e2ee: end-to-end encryption with matrix-js-sdk's Rust crypto (matrix-sdk-crypto-wasm,
// in-memory store), so calls work in encrypted rooms; the result counts events that stayed
// undecryptable (`decryption_failures`; those sent before this device existed apart, as
// `historical_undecryptable`).
// --only-signed-devices: Element's "exclude insecure devices" (OnlySignedDevicesIsolationMode):
// room keys go only to cross-signed devices, and only their events decrypt.
// --join-invites: joins every room it is invited to (a DM the other side creates); the
// result then names the room (`room_id`) and whether it is encrypted (`room_encrypted`).
//
// Run it inside a network namespace that has only `lo` (tests/e2e/loopback-only.sh); it
// refuses to start when any other interface has an address (see README.md, "Loopback").
// --dtmf: once connected (and --dtmf-after-s later), press DIGITS with MatrixCall.sendDtmfDigit,
// one every 400 ms (RTCDTMFSender replaces what is still queued). The result's `dtmf` says
// whether the other side advertised m.call.dtmf (opponentSupportsDTMF), which digits went out
// and why not. Either way the result's `telephone_event` says whether the remote SDP has a
// telephone-event payload type and `rtp.inbound.audio.packets` counts what arrived on audio
// (with a peer that sends no audio, only its DTMF packets).
//
// --audio-codec NAME: offers and answers name only that audio codec (e.g. `opus`: a peer that
// insists on Opus, as some clients do).
// --audio-pulse: the sine sounds only in the first 200 ms of each wall-clock second (the
// samples' own times: a sink on the same machine measures the latency from them).
//
// stdout: one JSON line at the end. stderr: progress lines (and matrix-js-sdk's own logs).
// Exit 0 when the call reached `connected` and received media frames, else 1 (2 = usage/env).

import process from "node:process";
import { parseArgs } from "node:util";
import wrtc from "@roamhq/wrtc";
import { pressDigits, recordCall, summarizeStats } from "./call-common.mjs";
import {
    guardCallEvents,
    installBrowserGlobals,
    nonLoopbackAddresses,
    restrictAudioCodec,
    setAudioPulse,
    stats,
    stopSyntheticMedia,
} from "./browser-env.mjs";

const { RTCAudioSink, RTCVideoSink } = wrtc.nonstandard;

// ---------------------------------------------------------------- arguments

const USAGE =
    "usage: node peer.mjs --homeserver URL --user @u:server --password PW " +
    "(--call ROOM_ID | --answer) [--duration-s N] [--max-wait-s N] [--voice] " +
    "[--require audio,video] [--e2ee [--only-signed-devices]] [--join-invites] " +
    "[--dtmf DIGITS] [--dtmf-after-s N] [--audio-codec NAME] [--audio-pulse] " +
    "[--allow-non-loopback] [--verbose]";

let args;
try {
    ({ values: args } = parseArgs({
        options: {
            homeserver: { type: "string" },
            user: { type: "string" },
            password: { type: "string" },
            call: { type: "string" },
            answer: { type: "boolean", default: false },
            "duration-s": { type: "string", default: "5" },
            "max-wait-s": { type: "string", default: "60" },
            voice: { type: "boolean", default: false },
            e2ee: { type: "boolean", default: false },
            "only-signed-devices": { type: "boolean", default: false },
            "join-invites": { type: "boolean", default: false },
            dtmf: { type: "string", default: "" },
            "dtmf-after-s": { type: "string", default: "1" },
            require: { type: "string", default: "" },
            "audio-codec": { type: "string", default: "" },
            "audio-pulse": { type: "boolean", default: false },
            "allow-non-loopback": { type: "boolean", default: false },
            verbose: { type: "boolean", default: false },
            help: { type: "boolean", default: false },
        },
    }));
} catch (e) {
    console.error(`${e.message}\n${USAGE}`);
    process.exit(2);
}
if (args.help) {
    console.error(USAGE);
    process.exit(0);
}
if (
    !args.homeserver || !args.user || !args.password || !!args.call === args.answer ||
    (args["only-signed-devices"] && !args.e2ee)
) {
    console.error(USAGE);
    process.exit(2);
}
const DURATION_MS = Number(args["duration-s"]) * 1000;
const MAX_WAIT_MS = Number(args["max-wait-s"]) * 1000;
if (!(DURATION_MS >= 0) || !(MAX_WAIT_MS > 0)) {
    console.error("--duration-s and --max-wait-s take numbers of seconds");
    process.exit(2);
}
const REQUIRE = new Set(args.require.split(",").filter(Boolean));
for (const k of REQUIRE) {
    if (k !== "audio" && k !== "video") {
        console.error(`--require takes audio and/or video, not ${k}`);
        process.exit(2);
    }
}

const T0 = Date.now();
const ME = args.user;
function progress(msg) {
    process.stderr.write(`[peer ${ME} +${((Date.now() - T0) / 1000).toFixed(2)}s] ${msg}\n`);
}

// matrix-js-sdk logs through console.*; keep stdout for the final JSON line alone.
const writeStdout = process.stdout.write.bind(process.stdout);
for (const level of ["log", "info", "debug", "trace"]) console[level] = console.error;

// ---------------------------------------------------------------- environment

const foreign = nonLoopbackAddresses();
if (foreign.length > 0 && !args["allow-non-loopback"]) {
    console.error(
        `peer.mjs: refusing to run: this network namespace has non-loopback addresses ` +
            `(${foreign.join(", ")}); libwebrtc would bind and gather on them. Run everything ` +
            `(Synapse, the peers, the agent) under tests/e2e/loopback-only.sh, or pass ` +
            `--allow-non-loopback.`,
    );
    process.exit(2);
}

installBrowserGlobals({ progress });
restrictAudioCodec(args["audio-codec"]);
setAudioPulse(args["audio-pulse"]);

// Imported only now: the SDK must see the globals above.
const sdk = await import("matrix-js-sdk");
const { logger } = await import("matrix-js-sdk/lib/logger.js");
logger.setLevel(args.verbose ? "debug" : "warn");
const { CallEvent, CallState, CallErrorCode } = await import("matrix-js-sdk/lib/webrtc/call.js");
const { CallEventHandlerEvent } = await import("matrix-js-sdk/lib/webrtc/callEventHandler.js");

// ---------------------------------------------------------------- result bookkeeping

const result = {
    role: args.call ? "caller" : "callee",
    user_id: ME,
    connected: false,
    video_frames_received: 0,
    audio_frames_received: 0,
    hangup_reason: null,
    hangup_party: null,
    call_id: null,
    state: null,
    timings_ms: {},
    remote_feeds: [],
    rtp: null,
    selected_pair: null,
    dropped_non_loopback_candidates: 0,
    e2ee: args.e2ee,
    only_signed_devices: args["only-signed-devices"],
    room_id: null,
    room_encrypted: null,
    decryption_failures: 0,
    historical_undecryptable: 0,
    dtmf: null,
    telephone_event: null,
    error: null,
};
const mark = (name) => {
    result.timings_ms[name] ??= Date.now() - T0;
};

const sinks = new Map(); // track id -> sink

// The last 2 s of received audio (first channel), for `result.audio_tone`: what share of the
// energy of its first second sits at a few frequencies (Goertzel), so a test can tell which
// tone the other side sent.
const audioTail = { rate: 0, chunks: [], samples: 0 };
function keepAudio(d) {
    const ch = d.channelCount || 1;
    const mono = new Float64Array(Math.floor(d.samples.length / ch));
    for (let i = 0; i < mono.length; i++) mono[i] = d.samples[i * ch];
    audioTail.rate = d.sampleRate;
    audioTail.chunks.push(mono);
    audioTail.samples += mono.length;
    while (audioTail.chunks.length > 1 && audioTail.samples - audioTail.chunks[0].length >= 2 * d.sampleRate) {
        audioTail.samples -= audioTail.chunks.shift().length;
    }
}
function toneShare(x, freq, rate) {
    const coeff = 2 * Math.cos((2 * Math.PI * freq) / rate);
    let s1 = 0, s2 = 0, energy = 0;
    for (const v of x) {
        const s = v + coeff * s1 - s2;
        s2 = s1;
        s1 = s;
        energy += v * v;
    }
    const power = s1 * s1 + s2 * s2 - coeff * s1 * s2;
    return energy === 0 ? 0 : (2 * power) / (x.length * energy);
}
function audioTone() {
    if (audioTail.rate === 0) return null;
    const all = new Float64Array(audioTail.samples);
    let off = 0;
    for (const c of audioTail.chunks) {
        all.set(c, off);
        off += c.length;
    }
    const x = all.subarray(0, Math.min(all.length, audioTail.rate));
    const rms = Math.sqrt(x.reduce((a, v) => a + v * v, 0) / Math.max(1, x.length));
    const shares = {};
    for (const f of [300, 440, 600, 1000, 1500]) shares[f] = toneShare(x, f, audioTail.rate);
    return { sample_rate: audioTail.rate, samples: x.length, rms, shares };
}
function attachSink(track) {
    if (!track || sinks.has(track.id)) return;
    if (track.kind === "video") {
        const sink = new RTCVideoSink(track);
        sink.onframe = ({ frame }) => {
            if (result.video_frames_received++ === 0) {
                mark("first_video_frame");
                progress(`first remote video frame ${frame.width}x${frame.height}`);
            }
        };
        sinks.set(track.id, sink);
    } else if (track.kind === "audio") {
        const sink = new RTCAudioSink(track);
        sink.ondata = (d) => {
            if (result.audio_frames_received++ === 0) {
                mark("first_audio_frame");
                progress(`first remote audio frame (${d.sampleRate} Hz, ${d.channelCount} ch)`);
            }
            keepAudio(d);
        };
        sinks.set(track.id, sink);
    }
}
function attachAllReceivers(pc) {
    try {
        for (const r of pc?.getReceivers?.() ?? []) attachSink(r.track);
    } catch (e) {
        progress(`getReceivers failed: ${e.message}`);
    }
}

async function snapshotStats(pc) {
    if (!pc || pc.connectionState === "closed") return;
    let report;
    try {
        report = await pc.getStats();
    } catch (e) {
        return;
    }
    const { rtp, selectedPair } = summarizeStats(report);
    result.rtp = rtp;
    if (selectedPair) result.selected_pair = selectedPair;
}

function describeFeeds(call) {
    try {
        const feeds = call.getRemoteFeeds();
        // Feeds are deleted when the call ends: keep the last description that had some.
        if (feeds.length === 0 && result.remote_feeds.length > 0) return;
        result.remote_feeds = feeds.map((f) => ({
            purpose: f.purpose,
            user_id: f.userId,
            audio_tracks: f.stream.getAudioTracks().length,
            video_tracks: f.stream.getVideoTracks().length,
            audio_muted: f.isAudioMuted(),
            video_muted: f.isVideoMuted(),
        }));
    } catch (e) {
        progress(`describing remote feeds failed: ${e.message}`);
    }
}

// ---------------------------------------------------------------- the call

let client;
let activeCall = null;
// Events whose last decryption attempt failed (a later success removes them).
const undecryptable = new Set();
// Events from before this device logged in that it cannot decrypt (no key backup).
const historical = new Set();
let finished = false;
let statsTimer = null;
let endTimer = null;
let hangupTimer = null;
const maxWaitTimer = setTimeout(() => {
    progress(`max wait of ${MAX_WAIT_MS / 1000} s reached`);
    if (activeCall && !activeCall.callHasEnded()) {
        void hangupAndFinish(result.connected ? "max wait reached while connected" : "never connected");
    } else {
        void finish(activeCall ? null : "timed out waiting for a call");
    }
}, MAX_WAIT_MS);

async function finish(error) {
    if (finished) return;
    finished = true;
    if (error && !result.error) result.error = error;
    clearTimeout(maxWaitTimer);
    clearTimeout(endTimer);
    clearTimeout(hangupTimer);
    clearInterval(statsTimer);
    if (activeCall) {
        describeFeeds(activeCall);
        result.call_id = activeCall.callId;
        result.room_id = activeCall.roomId;
        result.room_encrypted = client?.isRoomEncrypted?.(activeCall.roomId) ?? null;
        result.state = activeCall.state;
        result.hangup_reason ??= activeCall.hangupReason ?? null;
        result.hangup_party ??= activeCall.hangupParty ?? null;
    }
    result.dropped_non_loopback_candidates = stats.droppedCandidates;
    result.decryption_failures = undecryptable.size;
    result.historical_undecryptable = historical.size;
    result.timings_ms.total = Date.now() - T0;
    for (const s of sinks.values()) s.stop();
    result.audio_tone = audioTone();
    stopSyntheticMedia();
    try {
        client?.stopClient();
    } catch (e) {
        /* shutting down anyway */
    }
    const got = { audio: result.audio_frames_received, video: result.video_frames_received };
    let ok = result.connected && got.audio + got.video > 0;
    for (const k of REQUIRE) ok = ok && got[k] > 0;
    writeStdout(JSON.stringify(result) + "\n", () => process.exit(ok ? 0 : 1));
}

// Our own hangup (as caller, or on timeout): wait until the m.call.hangup is really sent.
async function hangupAndFinish(why) {
    const call = activeCall;
    await snapshotStats(call.peerConn);
    describeFeeds(call);
    progress(`hanging up (${why})`);
    const room = client.getRoom(call.roomId);
    const sent = new Promise((resolve) => {
        // The Timeline event comes first for the local echo; wait for the server's 200.
        const settle = (ev) => {
            if (ev.status === null || ev.status === sdk.EventStatus.SENT) resolve(true);
            else if (ev.status === sdk.EventStatus.NOT_SENT || ev.status === sdk.EventStatus.CANCELLED) resolve(false);
            else ev.once(sdk.MatrixEventEvent.Status, () => settle(ev));
        };
        const onTimeline = (ev) => {
            if (ev.getType() === "m.call.hangup" && ev.getSender() === ME && ev.getContent()?.call_id === call.callId) {
                client.off(sdk.RoomEvent.Timeline, onTimeline);
                settle(ev);
            }
        };
        client.on(sdk.RoomEvent.Timeline, onTimeline);
        hangupTimer = setTimeout(() => resolve(false), 5000);
    });
    call.hangup(CallErrorCode.UserHangup, false);
    const echoed = await sent;
    progress(echoed ? "hangup sent" : "hangup not seen back from the server within 5 s");
    if (!room) progress(`(room ${call.roomId} unknown to the client)`);
    await finish(result.connected ? null : why);
}

function watchCall(call) {
    activeCall = call;
    recordCall(call, result, progress, CallEvent.Error);
    call.on(CallEvent.State, (state, old) => {
        progress(`state ${old} -> ${state}`);
        mark(`state_${state}`);
        attachAllReceivers(call.peerConn);
        if (state === CallState.Ended && !hangupTimer) {
            // Ended without (or before) a Hangup event, e.g. a local media failure.
            setTimeout(() => void finish(null), 200);
        }
        if (state === CallState.Connected && !result.connected) {
            result.connected = true;
            mark("connected");
            progress(`connected; staying ${DURATION_MS / 1000} s`);
            statsTimer = setInterval(() => void snapshotStats(call.peerConn), 1000);
            const remoteSdp = call.peerConn?.remoteDescription?.sdp ?? "";
            result.telephone_event = /a=rtpmap:\d+ telephone-event\//.test(remoteSdp);
            if (args.dtmf) {
                setTimeout(() => (result.dtmf = pressDigits(call, args.dtmf, progress)), Number(args["dtmf-after-s"]) * 1000);
            }
            endTimer = setTimeout(() => {
                describeFeeds(call);
                if (args.call) {
                    void hangupAndFinish("duration elapsed");
                } else {
                    progress("duration elapsed; waiting for the remote hangup");
                }
            }, DURATION_MS);
        }
    });
    call.on(CallEvent.FeedsChanged, () => {
        attachAllReceivers(call.peerConn);
        describeFeeds(call);
    });
    call.on(CallEvent.Hangup, () => {
        progress(`call ended: reason=${call.hangupReason} party=${call.hangupParty}`);
        result.hangup_reason = call.hangupReason ?? null;
        result.hangup_party = call.hangupParty ?? null;
        if (!hangupTimer) void finish(null);
    });
}

async function main() {
    // Log in with a throwaway client, then build the real one with the session.
    const loginClient = sdk.createClient({ baseUrl: args.homeserver });
    const login = await loginClient.loginRequest({
        type: "m.login.password",
        identifier: { type: "m.id.user", user: ME },
        password: args.password,
        initial_device_display_name: `interop peer (${args.call ? "caller" : "callee"})`,
    });
    mark("logged_in");
    progress(`logged in as ${login.user_id} device ${login.device_id}`);
    client = sdk.createClient({
        baseUrl: args.homeserver,
        userId: login.user_id,
        accessToken: login.access_token,
        deviceId: login.device_id,
        // No STUN fallback to a public server, ever.
        fallbackICEServerAllowed: false,
        timelineSupport: false,
    });
    if (!client.callEventHandler) throw new Error("matrix-js-sdk says calls are unsupported (globals missing?)");
    guardCallEvents(client);
    if (args.e2ee) {
        await client.initRustCrypto({ useIndexedDB: false });
        mark("crypto_ready");
        progress(`Rust crypto ready (device ${login.device_id})`);
        if (args["only-signed-devices"]) {
            const { OnlySignedDevicesIsolationMode } = await import("matrix-js-sdk/lib/crypto-api/index.js");
            // As an Element user in this mode: their own account is cross-signed too (the
            // mode refuses to encrypt otherwise).
            await client.getCrypto().bootstrapCrossSigning({
                authUploadDeviceSigningKeys: async (makeRequest) => {
                    await makeRequest({
                        type: "m.login.password",
                        identifier: { type: "m.id.user", user: ME },
                        password: args.password,
                    });
                },
            });
            client.getCrypto().setDeviceIsolationMode(new OnlySignedDevicesIsolationMode());
            progress("cross-signed; keys only to and from cross-signed devices");
        }
        client.on(sdk.MatrixEventEvent.Decrypted, (ev) => {
            if (ev.isDecryptionFailure()) {
                // Sent before this (in-memory, brand new) device existed: no one owes it
                // those keys. Counted apart; everything newer must decrypt.
                if (String(ev.decryptionFailureReason ?? "").startsWith("HISTORICAL_MESSAGE")) {
                    historical.add(ev.getId());
                } else {
                    undecryptable.add(ev.getId());
                }
                progress(`cannot decrypt ${ev.getId()} from ${ev.getSender()}: ${ev.decryptionFailureReason ?? "?"}`);
            } else {
                undecryptable.delete(ev.getId());
                historical.delete(ev.getId());
            }
        });
    }

    if (args["join-invites"]) {
        client.on(sdk.RoomEvent.MyMembership, (room, membership) => {
            if (membership !== "invite") return;
            progress(`invited to ${room.roomId}; joining`);
            client.joinRoom(room.roomId).catch((e) => progress(`join ${room.roomId} failed: ${e.message}`));
        });
    }

    // Sinks for remote tracks as soon as they appear (both roles).
    client.on(CallEvent.PeerConnectionCreated, (pc) => {
        pc.addEventListener("track", (ev) => attachSink(ev.track));
    });

    const prepared = new Promise((resolve, reject) => {
        client.on(sdk.ClientEvent.Sync, (state, _prev, data) => {
            if (state === "PREPARED") resolve();
            if (state === "ERROR") progress(`sync error: ${data?.error?.message ?? "?"}`);
        });
        setTimeout(() => reject(new Error("initial sync did not finish in 30 s")), 30000).unref();
    });

    if (args.answer) {
        client.on(CallEventHandlerEvent.Incoming, (call) => {
            if (activeCall) {
                progress(`already in a call; rejecting ${call.callId}`);
                call.reject();
                return;
            }
            mark("incoming");
            progress(`incoming ${call.type} call ${call.callId} from ${call.getOpponentMember()?.userId ?? "?"}`);
            watchCall(call);
            void call.answer().catch((e) => void finish(`answer failed: ${e.message}`));
        });
    }

    await client.startClient({ initialSyncLimit: 1, lazyLoadMembers: false });
    await prepared;
    mark("prepared");
    progress("sync prepared");

    if (args.call) {
        const roomId = args.call;
        if (!client.getRoom(roomId)) throw new Error(`room ${roomId} not found after sync (not joined?)`);
        const call = sdk.createNewMatrixCall(client, roomId);
        if (!call) throw new Error("createNewMatrixCall returned null");
        watchCall(call);
        mark("placing");
        await (args.voice ? call.placeVoiceCall() : call.placeVideoCall());
        progress(`${args.voice ? "voice" : "video"} call placed`);
    } else {
        progress("waiting for an incoming call");
    }
}

for (const sig of ["SIGINT", "SIGTERM"]) {
    process.on(sig, () => {
        progress(`${sig}`);
        if (activeCall && !activeCall.callHasEnded()) void hangupAndFinish(sig);
        else void finish(sig);
    });
}
process.on("unhandledRejection", (e) => progress(`unhandled rejection: ${e?.stack ?? e}`));

main().catch((e) => {
    progress(`failed: ${e?.stack ?? e}`);
    void finish(String(e?.message ?? e));
});

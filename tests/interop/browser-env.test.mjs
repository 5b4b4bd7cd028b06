// Unit tests for the interop peer's browser environment and loopback guards.
// `node --test` (or `npm test`) in tests/interop. Opens no socket: no RTCPeerConnection here.
import assert from "node:assert/strict";
import { test } from "node:test";
import wrtc from "@roamhq/wrtc";
import {
    filterCallContent,
    filterSdp,
    guardCallEvents,
    iceServerIsLoopback,
    installBrowserGlobals,
    keepCandidate,
    mediaDevices,
    onlyAudioCodec,
    stopSyntheticMedia,
} from "./browser-env.mjs";

const V4 = "candidate:1510613869 1 udp 2122194687 127.0.0.1 46110 typ host generation 0";
const V6 = "candidate:559267639 1 udp 2122267903 ::1 49043 typ host generation 0";
const LAN = "candidate:842163049 1 udp 1677729535 192.0.2.2 51000 typ host generation 0";
const RELAY = "candidate:3 1 udp 41885439 198.51.100.7 50001 typ relay raddr 127.0.0.1 rport 4000";

test("keepCandidate keeps loopback and end-of-candidates only", () => {
    assert.equal(keepCandidate(V4), true);
    assert.equal(keepCandidate(V6), true);
    assert.equal(keepCandidate(""), true);
    assert.equal(keepCandidate(LAN), false);
    assert.equal(keepCandidate(RELAY), false);
    assert.equal(keepCandidate("a=" + LAN), false);
});

test("filterSdp drops non-loopback candidate lines and keeps the rest", () => {
    const sdp = ["v=0", "m=audio 9 UDP/TLS/RTP/SAVPF 111", `a=${V4}`, `a=${LAN}`, `a=${V6}`, "a=end-of-candidates", ""].join("\r\n");
    const out = filterSdp(sdp);
    assert.equal(out, ["v=0", "m=audio 9 UDP/TLS/RTP/SAVPF 111", `a=${V4}`, `a=${V6}`, "a=end-of-candidates", ""].join("\r\n"));
    assert.equal(filterSdp(undefined), undefined);
});

test("filterCallContent filters m.call.* SDP and candidates, nothing else", () => {
    const invite = { call_id: "c", offer: { type: "offer", sdp: `v=0\r\na=${LAN}\r\na=${V4}\r\n` }, version: "1" };
    const out = filterCallContent("m.call.invite", invite);
    assert.equal(out.offer.sdp, `v=0\r\na=${V4}\r\n`);
    assert.equal(invite.offer.sdp.includes("192.0.2.2"), true, "input not mutated");
    const cands = filterCallContent("m.call.candidates", {
        candidates: [{ candidate: LAN, sdpMid: "0" }, { candidate: V4, sdpMid: "0" }, { candidate: "", sdpMid: "0" }],
    });
    assert.deepEqual(cands.candidates.map((c) => c.candidate), [V4, ""]);
    const neg = filterCallContent("m.call.negotiate", { description: { type: "answer", sdp: `a=${RELAY}\n` } });
    assert.equal(neg.description.sdp, "");
    const msg = { body: `a=${LAN}` };
    assert.equal(filterCallContent("m.room.message", msg), msg);
});

test("guardCallEvents filters both sendEvent overloads", async () => {
    const sent = [];
    const client = { sendEvent: async (...a) => sent.push(a) };
    guardCallEvents(client);
    await client.sendEvent("!r", "m.call.candidates", { candidates: [{ candidate: LAN }] });
    await client.sendEvent("!r", null, "m.call.candidates", { candidates: [{ candidate: LAN }, { candidate: V6 }] }, "txn");
    assert.deepEqual(sent[0], ["!r", "m.call.candidates", { candidates: [] }]);
    assert.deepEqual(sent[1], ["!r", null, "m.call.candidates", { candidates: [{ candidate: V6 }] }, "txn"]);
});

test("only loopback ICE servers pass", () => {
    assert.equal(iceServerIsLoopback({ urls: ["turn:127.0.0.1:3478?transport=udp"] }), true);
    assert.equal(iceServerIsLoopback({ urls: "stun:[::1]:3478" }), true);
    assert.equal(iceServerIsLoopback({ urls: ["turn:localhost:3478"] }), true);
    assert.equal(iceServerIsLoopback({ urls: ["turn:127.0.0.1:3478", "turn:turn.example.org:3478"] }), false);
    assert.equal(iceServerIsLoopback({ urls: ["stun:192.0.2.1:3478"] }), false);
});

test("synthetic getUserMedia yields live audio and video that sinks receive", async () => {
    const devices = await mediaDevices.enumerateDevices();
    assert.deepEqual(devices.map((d) => d.kind).sort(), ["audioinput", "audiooutput", "videoinput"]);
    const stream = await mediaDevices.getUserMedia({ audio: true, video: { width: 320 } });
    assert.equal(stream.getAudioTracks().length, 1);
    assert.equal(stream.getVideoTracks().length, 1);
    const counts = { audio: 0, video: 0, width: 0 };
    const a = new wrtc.nonstandard.RTCAudioSink(stream.getAudioTracks()[0]);
    a.ondata = () => counts.audio++;
    const v = new wrtc.nonstandard.RTCVideoSink(stream.getVideoTracks()[0]);
    v.onframe = ({ frame }) => {
        counts.video++;
        counts.width = frame.width;
    };
    await new Promise((r) => setTimeout(r, 500));
    a.stop();
    v.stop();
    for (const t of stream.getTracks()) t.stop();
    stopSyntheticMedia();
    assert.ok(counts.audio >= 20, `audio chunks in 500 ms: ${counts.audio}`);
    assert.ok(counts.video >= 3, `video frames in 500 ms: ${counts.video}`);
    assert.equal(counts.width, 320);
});

test("matrix-js-sdk sees WebRTC support once the globals are installed", async () => {
    installBrowserGlobals();
    const { supportsMatrixCall } = await import("matrix-js-sdk/lib/webrtc/call.js");
    assert.equal(supportsMatrixCall(), true);
    assert.equal(typeof navigator.mediaDevices.getUserMedia, "function");
    assert.equal(window.RTCPeerConnection.name, "LoopbackRTCPeerConnection");
});

test("onlyAudioCodec keeps one audio codec and leaves video alone", () => {
    const sdp = [
        "v=0",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111 63 0 8 126",
        "a=rtpmap:111 opus/48000/2",
        "a=rtcp-fb:111 transport-cc",
        "a=fmtp:111 minptime=10;useinbandfec=1",
        "a=rtpmap:63 red/48000/2",
        "a=fmtp:63 111/111",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:8 PCMA/8000",
        "a=rtpmap:126 telephone-event/8000",
        "a=mid:0",
        "m=video 9 UDP/TLS/RTP/SAVPF 96",
        "a=rtpmap:96 VP8/90000",
        "a=fmtp:96 x=1",
        "",
    ].join("\r\n");
    assert.equal(
        onlyAudioCodec(sdp, "OPUS"),
        [
            "v=0",
            "m=audio 9 UDP/TLS/RTP/SAVPF 111",
            "a=rtpmap:111 opus/48000/2",
            "a=rtcp-fb:111 transport-cc",
            "a=fmtp:111 minptime=10;useinbandfec=1",
            "a=mid:0",
            "m=video 9 UDP/TLS/RTP/SAVPF 96",
            "a=rtpmap:96 VP8/90000",
            "a=fmtp:96 x=1",
            "",
        ].join("\r\n"),
    );
    assert.equal(onlyAudioCodec(sdp, ""), sdp);
});

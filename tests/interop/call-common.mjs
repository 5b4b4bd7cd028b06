// What peer.mjs (Node + @roamhq/wrtc) and browser/page.mjs (Chromium) share: pressing
// digits like Element's dial pad, and the getStats summary both report. Plain ES, no Node
// or browser API, so the Node peer imports it and esbuild bundles it into the page.

/**
 * Presses `digits` with MatrixCall.sendDtmfDigit, one every 400 ms (an RTCDTMFSender
 * replaces tones still queued). Returns the live record: `opponent_supports_dtmf` (the other
 * side's m.call.dtmf), `sent` (digits handed over so far) and `error` (why one failed).
 */
export function pressDigits(call, digits, progress) {
    const queue = [...digits];
    const record = { opponent_supports_dtmf: call.opponentSupportsDTMF(), sent: "", error: null };
    progress(`opponentSupportsDTMF() = ${record.opponent_supports_dtmf}; pressing ${queue.length} digits`);
    const next = () => {
        const digit = queue.shift();
        if (digit === undefined || call.callHasEnded()) return;
        try {
            call.sendDtmfDigit(digit);
            record.sent += digit;
            progress(`pressed ${digit}`);
            setTimeout(next, 400);
        } catch (e) {
            record.error = e.message;
            progress(`sendDtmfDigit(${digit}) failed: ${e.message}`);
        }
    };
    next();
    return record;
}

/**
 * The getStats report of a call in short: per direction and kind the codec, packets, bytes
 * and frames decoded/encoded (video) or samples received (audio), and the nominated pair.
 */
export function summarizeStats(report) {
    const byId = new Map();
    report.forEach((s) => byId.set(s.id, s));
    const rtp = { inbound: {}, outbound: {} };
    let selectedPair = null;
    for (const s of byId.values()) {
        const kind = s.kind ?? s.mediaType;
        const codec = byId.get(s.codecId)?.mimeType ?? null;
        if (s.type === "inbound-rtp") {
            rtp.inbound[kind] = {
                codec,
                packets: s.packetsReceived ?? 0,
                bytes: s.bytesReceived ?? 0,
                ...(kind === "video" ? { frames_decoded: s.framesDecoded ?? 0 } : {}),
                ...(kind === "audio" && s.totalSamplesReceived !== undefined ? { samples: s.totalSamplesReceived } : {}),
            };
        } else if (s.type === "outbound-rtp") {
            rtp.outbound[kind] = {
                codec,
                packets: s.packetsSent ?? 0,
                bytes: s.bytesSent ?? 0,
                ...(kind === "video" ? { frames_encoded: s.framesEncoded ?? 0 } : {}),
            };
        } else if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded") {
            const addr = (c) => c && `${c.address ?? c.ip}:${c.port} ${c.candidateType}`;
            selectedPair = { local: addr(byId.get(s.localCandidateId)), remote: addr(byId.get(s.remoteCandidateId)) };
        }
    }
    return { rtp, selectedPair };
}

/**
 * Starts watching `call` as the peers' result: its id, and its first error (code and
 * message) in `result.error`. `errorEvent` is matrix-js-sdk's `CallEvent.Error`.
 */
export function recordCall(call, result, progress, errorEvent) {
    result.call_id = call.callId;
    progress(`call ${call.callId} in ${call.roomId}`);
    call.on(errorEvent, (err) => {
        progress(`call error: ${err.code ?? ""} ${err.message}`);
        result.error ??= `${err.code ?? "error"}: ${err.message}`;
    });
}

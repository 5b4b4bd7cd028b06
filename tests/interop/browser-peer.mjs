#!/usr/bin/env node
// The browser peer: matrix-js-sdk's MatrixCall running in headless Chromium with the
// browser's own WebRTC, as Element Web runs it; the one peer here that has an RTCDTMFSender
// (@roamhq/wrtc has none), so it presses dial-pad digits for real.
//
//   node browser-peer.mjs --homeserver URL --user @u:server (--answer | --call ROOM_ID)
//        [--voice] [--e2ee] [--audio-wav FILE [--raw-audio]] [--dtmf DIGITS] [--dtmf-after-s 1] [--duration-s 5] [--max-wait-s 60]
//        [--verbose]
//   The password comes from $PEER_PASSWORD (never a command line: Chromium's is readable by
//   every user); Chromium from $CHROMIUM or /usr/bin/chromium (Debian's `chromium`).
//
// How: esbuild bundles browser/page.mjs with matrix-js-sdk; a 127.0.0.1 HTTP server of this
// process serves the page, its /config (with the password) and takes its /log lines and
// its /result; Chromium (a fresh profile in a 0700 temp dir, fake camera and microphone)
// opens the page. stdout: exactly one JSON line (the page's result); exit 0 iff connected.
// Like peer.mjs it refuses to run where any interface but loopback has an address.
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:http";
import { networkInterfaces, tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const { values: args } = parseArgs({
    options: {
        homeserver: { type: "string" },
        user: { type: "string" },
        answer: { type: "boolean", default: false },
        call: { type: "string" },
        voice: { type: "boolean", default: false },
        e2ee: { type: "boolean", default: false },
        "audio-wav": { type: "string" },
        "raw-audio": { type: "boolean", default: false },
        dtmf: { type: "string", default: "" },
        "dtmf-after-s": { type: "string", default: "1" },
        "duration-s": { type: "string", default: "5" },
        "max-wait-s": { type: "string", default: "60" },
        verbose: { type: "boolean", default: false },
    },
});
const T0 = Date.now();
const progress = (line) => console.error(`[browser ${args.user} +${((Date.now() - T0) / 1000).toFixed(2)}s] ${line}`);
const usage = (why) => {
    console.error(`browser-peer.mjs: ${why}`);
    process.exit(2);
};
if (!args.homeserver || !args.user) usage("--homeserver and --user are required");
if (!args.answer === !args.call) usage("exactly one of --answer and --call ROOM_ID");
const password = process.env.PEER_PASSWORD;
if (!password) usage("the password goes in $PEER_PASSWORD");
const foreign = Object.entries(networkInterfaces()).flatMap(([name, addrs]) =>
    addrs.filter((a) => !a.internal).map((a) => `${name} ${a.address}`),
);
if (foreign.length > 0) {
    usage(`refusing to run: non-loopback addresses here (${foreign.join(", ")}); use tests/e2e/loopback-only.sh`);
}
const chromium = process.env.CHROMIUM ?? "/usr/bin/chromium";
const maxWaitMs = Number(args["max-wait-s"]) * 1000;

const bundle = await esbuild.build({
    entryPoints: [join(here, "browser/page.mjs")],
    bundle: true,
    format: "esm",
    platform: "browser",
    target: "chrome120",
    write: false,
    logLevel: "error",
    define: { global: "globalThis" },
});
const script = bundle.outputFiles[0].contents;
const cryptoWasm = join(here, "node_modules/@matrix-org/matrix-sdk-crypto-wasm/pkg/matrix_sdk_crypto_wasm_bg.wasm");
progress(`page bundled (${(script.length / 1e6).toFixed(1)} MB)`);

const config = {
    homeserver: args.homeserver,
    user: args.user,
    password,
    call: args.call ?? null,
    voice: args.voice,
    e2ee: args.e2ee,
    raw_audio: args["raw-audio"],
    dtmf: args.dtmf,
    dtmf_after_ms: Number(args["dtmf-after-s"]) * 1000,
    duration_ms: Number(args["duration-s"]) * 1000,
    max_wait_ms: maxWaitMs,
    verbose: args.verbose,
};

let browser = null;
let profile = null;
let done = false;
async function end(result, code) {
    if (done) return;
    done = true;
    // Chromium first (our child, by PID), then its profile once nothing writes there.
    if (browser && browser.exitCode === null && browser.signalCode === null) {
        const exited = new Promise((resolve) => browser.once("exit", resolve));
        browser.kill("SIGKILL");
        await Promise.race([exited, new Promise((resolve) => setTimeout(resolve, 5000))]);
    }
    try {
        if (profile) rmSync(profile, { recursive: true, force: true, maxRetries: 5 });
    } catch (e) {
        progress(`could not remove the profile ${profile}: ${e.message}`);
    }
    process.stdout.write(JSON.stringify(result) + "\n", () => process.exit(code));
}

const server = createServer((req, res) => {
    const reply = (status, type, body) => {
        res.writeHead(status, { "content-type": type, "cache-control": "no-store" });
        res.end(body);
    };
    const json = () =>
        new Promise((resolve) => {
            let body = "";
            req.on("data", (c) => (body += c));
            req.on("end", () => {
                try {
                    resolve(JSON.parse(body));
                } catch {
                    resolve(null);
                }
            });
        });
    if (req.method === "GET" && req.url === "/") {
        reply(200, "text/html", '<!doctype html><meta charset="utf-8"><title>browser peer</title><script type="module" src="/page.js"></script>');
    } else if (req.method === "GET" && req.url === "/page.js") {
        reply(200, "text/javascript", script);
    } else if (req.method === "GET" && req.url === "/config") {
        reply(200, "application/json", JSON.stringify(config));
    } else if (req.method === "POST" && req.url === "/log") {
        void json().then((b) => progress(b?.line ?? "(bad log line)"));
        reply(204, "text/plain", "");
    } else if (req.method === "POST" && req.url === "/result") {
        void json().then((r) => {
            reply(204, "text/plain", "");
            if (!r) return void end({ error: "the page sent an unreadable result" }, 1);
            void end(r, r.connected ? 0 : 1);
        });
    } else if (req.method === "GET" && req.url === "/pkg/matrix_sdk_crypto_wasm_bg.wasm") {
        // --e2ee: matrix-sdk-crypto-wasm fetches its module next to the bundle.
        reply(200, "application/wasm", readFileSync(cryptoWasm));
    } else if (req.method === "GET" && req.url === "/favicon.ico") {
        reply(404, "text/plain", "");
    } else {
        progress(`unexpected request ${req.method} ${req.url}`);
        reply(404, "text/plain", "");
    }
});
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
const url = `http://127.0.0.1:${server.address().port}/`;

// A fresh profile each run: no cached state, no leftover permissions.
profile = mkdtempSync(join(tmpdir(), "browser-peer-"));
browser = spawn(
    chromium,
    [
        "--headless=new",
        // Root in a container: Chromium's sandbox needs user namespaces it cannot make here.
        "--no-sandbox",
        `--user-data-dir=${profile}`,
        // A fake camera (test pattern) and microphone (beeps), granted without a prompt.
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        // --audio-wav: the microphone plays this WAV (looped) instead of the fake beeps.
        ...(args["audio-wav"] ? [`--use-file-for-fake-audio-capture=${args["audio-wav"]}`] : []),
        "--autoplay-policy=no-user-gesture-required",
        // Chromium leaves loopback out of WebRTC's networks; here it is the only one.
        "--allow-loopback-in-peer-connection",
        // Nothing but the page: no updater, sync, metrics or first-run traffic.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-sync",
        "--metrics-recording-only",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        // --verbose: Chromium's own log on our stderr, WebRTC's ICE included.
        ...(args.verbose ? ["--enable-logging=stderr", "--vmodule=*p2p*=2,*webrtc*=1,*ipc_network*=2"] : []),
        url,
    ],
    { stdio: ["ignore", "ignore", args.verbose ? "inherit" : "ignore"] },
);
progress(`chromium pid ${browser.pid} opened ${url}`);
browser.on("exit", (code, sig) => void end({ error: `chromium exited (${code ?? sig}) before the page's result` }, 1));
setTimeout(() => void end({ error: `no result from the page within ${maxWaitMs / 1000 + 15} s` }, 1), maxWaitMs + 15000);
for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => void end({ error: sig }, 1));

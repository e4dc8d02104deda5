// End-to-end test of the page: serves web/ (built by `wasm-pack build … --out-dir ../../web/pkg`)
// on localhost, opens it in headless Chromium with WebGPU, sets a short run through the form,
// presses Train, waits for the updates, and checks that the evaluation reward rose and that
// the sample grid shows images. Saves a screenshot.
//
//   node tests/e2e/e2e.mjs [--updates 2] [--steps 4] [--batch 1] [--preview 2] [--method draft-k]
//                          [--lr 0.01] [--refresh 2] [--device webgpu|cpu] [--screenshot FILE]
//
// Prints one JSON line with the figures (updates/s included) for docs/web.md.
import { createServer } from "node:http";
import { brotliCompressSync, gzipSync, constants as zlib } from "node:zlib";
import { readFile, mkdir } from "node:fs/promises";
import { dirname, extname, join, normalize, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { launch } from "./chromium.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const WEB = resolve(here, "../../web");
const { values: args } = parseArgs({
  options: {
    // Small: SwiftShader, CI's WebGPU, emulates the GPU on the CPU (~5 s per UNet call).
    updates: { type: "string", default: "2" },
    steps: { type: "string", default: "4" },
    batch: { type: "string", default: "1" },
    preview: { type: "string", default: "2" },
    method: { type: "string", default: "draft-k" },
    lr: { type: "string", default: "0.01" },
    device: { type: "string", default: "webgpu" },
    refresh: { type: "string", default: "2" },
    timeout: { type: "string", default: "1200" },
    screenshot: { type: "string", default: resolve(here, "../../target/e2e/web-demo.png") },
  },
});

const MIME = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".wasm": "application/wasm",
  ".json": "application/json",
  ".png": "image/png",
};

// Compressed once per file and encoding, as a static server with precompressed files would
// serve them (brotli when the browser offers it, else gzip).
const compressed = new Map();
function encode(file, body, encoding) {
  const key = `${encoding}:${file}`;
  if (!compressed.has(key)) {
    compressed.set(key, encoding === "br"
      ? brotliCompressSync(body, { params: { [zlib.BROTLI_PARAM_QUALITY]: 9, [zlib.BROTLI_PARAM_SIZE_HINT]: body.length } })
      : gzipSync(body, { level: 9 }));
  }
  return compressed.get(key);
}

// Bytes on the wire per file (bodies as sent), and uncompressed.
const transferred = new Map();

function serve() {
  const server = createServer(async (req, res) => {
    const path = normalize(decodeURIComponent(new URL(req.url, "http://x").pathname));
    const file = join(WEB, path.endsWith("/") ? join(path, "index.html") : path);
    if (!file.startsWith(WEB)) {
      res.writeHead(403).end();
      return;
    }
    try {
      const raw = await readFile(file);
      const accept = String(req.headers["accept-encoding"] ?? "");
      const encoding = /\bbr\b/.test(accept) ? "br" : /\bgzip\b/.test(accept) ? "gzip" : null;
      const body = encoding ? encode(file, raw, encoding) : raw;
      const headers = { "content-type": MIME[extname(file)] ?? "application/octet-stream" };
      if (encoding) headers["content-encoding"] = encoding;
      // Cross-origin isolated, so the page can share its Stop flag with the trainer's worker.
      headers["cross-origin-opener-policy"] = "same-origin";
      headers["cross-origin-embedder-policy"] = "require-corp";
      res.writeHead(200, headers);
      res.end(body);
      transferred.set(path, { sent: body.length, size: raw.length, encoding });
    } catch {
      res.writeHead(404).end("not found");
    }
  });
  return new Promise((ok) => server.listen(0, "127.0.0.1", () => ok(server)));
}

// The download the page may cost (issue 17: ≤ 15 MB compressed).
const MAX_TRANSFER = 15e6;
// The longest pause of the page's drawing allowed while it trains.
const MAX_FRAME_GAP_MS = 250;

const mean = (xs) => xs.reduce((a, b) => a + b, 0) / Math.max(xs.length, 1);

function fail(message) {
  console.error(`e2e: FAIL: ${message}`);
  process.exitCode = 1;
}

const server = await serve();
const url = `http://127.0.0.1:${server.address().port}/`;
const browser = await launch();
const t0 = Date.now();
const log = (m) => console.error(`[e2e ${((Date.now() - t0) / 1000).toFixed(1)} s] ${m}`);
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1100 } });
  page.on("console", (m) => log(`console.${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => log(`page error: ${e.message}`));
  await page.goto(url);
  await page.waitForSelector("body[data-state=idle]", { timeout: 60_000 });
  log("page ready");

  // A short run, set through the form as a user would.
  await page.selectOption("#device", args.device);
  await page.selectOption("#method", args.method);
  await page.fill("#train-steps", args.updates);
  await page.fill("#steps", args.steps);
  await page.fill("#lr", args.lr);
  await page.fill("#refresh", args.refresh);
  await page.fill("#batch", args.batch);
  await page.fill("#preview", args.preview);
  // Pressed from a timer, so that the test never waits on the page's click handler.
  await page.focus("#train");
  await page.evaluate(() => setTimeout(() => document.getElementById("train").click(), 0));

  const timeout = Number(args.timeout) * 1000;
  await page.waitForFunction(() => ["done", "error"].includes(document.body.dataset.state), null, {
    timeout,
    polling: 1000,
  });
  const result = await page.evaluate(() => ({
    state: document.body.dataset.state,
    error: document.getElementById("error").textContent,
    status: document.getElementById("status").textContent,
    before: window.draft.before,
    evals: window.draft.evals,
    rewards: window.draft.steps.map((s) => s.reward_mean),
    seconds: window.draft.steps.map((s) => s.seconds),
    updates: window.draft.steps.length,
    trainedSeconds: window.draft.trainedSeconds,
    device: window.draft.info?.device,
    maxFrameGap: window.draft.maxFrameGap,
    progressEvents: window.draft.progressEvents,
    isolated: self.crossOriginIsolated,
    // Images rendered: canvases whose pixels are not all one value.
    canvases: [...document.querySelectorAll("#grid canvas")].map((c) => {
      const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
      let min = 255, max = 0;
      for (let i = 0; i < d.length; i += 4) for (let k = 0; k < 3; k++) {
        min = Math.min(min, d[i + k]);
        max = Math.max(max, d[i + k]);
      }
      return { width: c.width, alpha: d[3], range: max - min };
    }),
  }));
  // Stop within an update: continue the run by two updates and press Stop at the first
  // sampling step; the update is abandoned (the run stays at its updates) within a step.
  let stop = null;
  if (result.state === "done") {
    await page.fill("#train-steps", String(Number(args.updates) + 2));
    await page.evaluate(() => {
      window.draft.progressEvents = 0;
      setTimeout(() => document.getElementById("train").click(), 0);
    });
    await page.waitForFunction(() => window.draft.progressEvents > 0, null, { timeout, polling: 20 });
    const pressed = Date.now();
    await page.click("#stop");
    await page.waitForFunction(() => document.body.dataset.state !== "training", null, { timeout, polling: 20 });
    stop = await page.evaluate(() => ({
      state: document.body.dataset.state,
      error: document.getElementById("error").textContent,
      updates: window.draft.updates,
    }));
    stop.seconds = (Date.now() - pressed) / 1000;
  }
  await mkdir(dirname(args.screenshot), { recursive: true });
  await page.screenshot({ path: args.screenshot, fullPage: true });
  log(`screenshot: ${args.screenshot}`);

  const last = result.evals.at(-1);
  const figures = {
    device: result.device,
    updates: result.updates,
    samplingSteps: Number(args.steps),
    method: args.method,
    evalRewardBefore: result.before?.reward,
    evalRewardAfter: last?.reward,
    // Each update's own time (the first includes compiling the kernels), and the rest's mean.
    secondsPerUpdate: result.seconds,
    meanSecondsAfterFirst: mean(result.seconds.slice(1)),
    updatesPerSecondAfterFirst: 1 / mean(result.seconds.slice(1)),
    // The longest time between two animation frames of the page while it trained (ms).
    maxFrameGapMs: result.maxFrameGap,
    progressEvents: result.progressEvents,
    crossOriginIsolated: result.isolated,
    // Seconds from Stop to the page idle again, mid-update.
    stopSeconds: stop?.seconds,
    // What the page downloads: every file as sent (compressed) and its size on disk.
    transferredBytes: [...transferred.values()].reduce((a, f) => a + f.sent, 0),
    uncompressedBytes: [...transferred.values()].reduce((a, f) => a + f.size, 0),
    wasm: transferred.get("/pkg/draft_web_bg.wasm"),
  };
  console.log(JSON.stringify(figures));
  if (result.state !== "done") fail(`the page ended in state ${result.state}: ${result.error}`);
  else {
    if (result.updates !== Number(args.updates)) fail(`${result.updates} updates, wanted ${args.updates}`);
    if (!(last && last.update === result.updates)) fail("no evaluation after the last update");
    if (!(last && last.reward > result.before.reward)) {
      fail(`the evaluation reward did not rise: ${result.before?.reward} → ${last?.reward}`);
    }
    if (result.canvases.length === 0) fail("no sample images on the page");
    // At least one sampling step and one backward step reported per update.
    const perUpdate = 2;
    if (!(result.progressEvents >= result.updates * perUpdate)) {
      fail(`${result.progressEvents} progress messages for ${result.updates} updates of ${perUpdate} steps`);
    }
    if (!result.isolated) fail("the page is not cross-origin isolated: Stop cannot reach the worker");
    if (!stop || stop.state !== "done" || stop.updates !== result.updates) {
      fail(`Stop within an update: ${JSON.stringify(stop)} (wanted state done at ${result.updates} updates)`);
    } else if (!(stop.seconds < 0.75 * figures.meanSecondsAfterFirst + 1)) {
      fail(`Stop took ${stop.seconds} s, an update takes ${figures.meanSecondsAfterFirst} s`);
    }
    // The trainer runs in a worker: the page keeps drawing during an update.
    if (!(result.maxFrameGap > 0 && result.maxFrameGap < MAX_FRAME_GAP_MS)) {
      fail(`the page froze: ${result.maxFrameGap} ms between two frames while training (limit ${MAX_FRAME_GAP_MS})`);
    }
    if (!(figures.wasm && figures.wasm.encoding)) fail(`the module was not served compressed: ${JSON.stringify(figures.wasm)}`);
    if (figures.transferredBytes > MAX_TRANSFER) {
      fail(`the page downloads ${figures.transferredBytes} bytes, over the ${MAX_TRANSFER} target`);
    }
    for (const c of result.canvases) {
      if (c.alpha !== 255 || c.range < 10) fail(`a sample image is blank: ${JSON.stringify(c)}`);
    }
  }
  if (!process.exitCode) console.error("e2e: ok");
} catch (e) {
  fail(e.stack ?? String(e));
} finally {
  await browser.close();
  server.close();
}

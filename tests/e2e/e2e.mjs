// End-to-end test of the page: serves web/ (built by `wasm-pack build … --out-dir ../../web/pkg`)
// on localhost, opens it in headless Chromium with WebGPU, sets a short run through the form,
// presses Train, waits for the updates, and checks that the evaluation reward rose and that
// the sample grid shows images. Saves a screenshot.
//
//   node tests/e2e/e2e.mjs [--updates 2] [--steps 4] [--batch 1] [--preview 2] [--method draft-k]
//                          [--lr 0.01] [--refresh 2] [--device webgpu|cpu] [--screenshot FILE]
//   node tests/e2e/e2e.mjs --real-size DIR   # opt-in: only the real-size check (realSize below)
//
// Prints one JSON line with the figures (updates/s included) for docs/web.md.
import { createServer } from "node:http";
import { brotliCompressSync, gzipSync, constants as zlib } from "node:zlib";
import { readFile, writeFile, mkdir, mkdtemp } from "node:fs/promises";
import { execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, dirname, extname, join, normalize, resolve } from "node:path";
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
    // The `draft` binary for the checkpoint round trip (default: the release build).
    draft: { type: "string" },
    // Opt-in: only the real-size check, on this folder (tests/fixtures/make_sd14_pipeline.py).
    "real-size": { type: "string" },
  },
});
const DRAFT = args.draft ?? process.env.DRAFT_BIN ??
  join(process.env.CARGO_TARGET_DIR ? resolve(process.env.CARGO_TARGET_DIR) : resolve(here, "../../target"), "release/draft");

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

// --- Runs that survive a reload, and the checkpoint round trip with `draft train` ----------
// On the CPU backend, where a run is deterministic: the page's run kept in OPFS, reloaded
// mid-run and resumed, must end on the uninterrupted run's LoRA byte for byte; a page
// checkpoint resumed by `draft train --resume` and a `draft train` checkpoint opened in the page
// must end where the other side's uninterrupted run does (the browser's WebAssembly and the
// native binary share the code; their maths libraries may differ in the last bit).
const RUN = { method: "draft-k", steps: "4", batch: "1", preview: "2", lr: "0.01", refresh: "2", checkpointEvery: "2", updates: 6 };
// Across the two, relative to the largest LoRA up-projection weight (zero at the start, so
// every bit of it is training): Adam divides each gradient by its running RMS, which turns the
// last-bit differences of tiny gradient entries into visible ones. Measured: 2.4e-3.
const CROSS_TOLERANCE = 1e-2;

// A safetensors file's tensors: name → Float32Array (f32 only, as draft writes LoRAs).
function safetensors(bytes) {
  const n = Number(Buffer.from(bytes).readBigUInt64LE(0));
  const header = JSON.parse(Buffer.from(bytes.subarray(8, 8 + n)).toString("utf8"));
  const out = new Map();
  for (const [name, t] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    const [a, b] = t.data_offsets;
    const data = bytes.slice(8 + n + a, 8 + n + b);
    out.set(name, new Float32Array(data.buffer, data.byteOffset, (b - a) / 4));
  }
  return out;
}

// Largest |a − b| over two LoRA files' tensors (Infinity when their names differ); with
// `relative`, over the largest |b| of the up-projections (diffusers' `lora.up`, `lora_B`).
function loraDiff(x, y, relative = false) {
  const a = safetensors(x), b = safetensors(y);
  if (a.size === 0 || a.size !== b.size) return Infinity;
  let max = 0, scale = 0;
  for (const [name, t] of a) {
    const u = b.get(name);
    if (!u || u.length !== t.length) return Infinity;
    const up = /lora\.up|lora_B/.test(name);
    for (let i = 0; i < t.length; i++) {
      max = Math.max(max, Math.abs(t[i] - u[i]));
      if (up) scale = Math.max(scale, Math.abs(u[i]));
    }
  }
  return relative ? max / scale : max;
}

function draft(argv) {
  log(`draft ${argv.join(" ")}`);
  execFileSync(DRAFT, argv, { stdio: ["ignore", "ignore", "pipe"] });
}

const cliFlags = (updates, outDir) => [
  "train", "--device", "cpu", "--method", RUN.method, "--steps", RUN.steps, "--batch", RUN.batch,
  "--preview", RUN.preview, "--lr", RUN.lr, "--eval-every", RUN.refresh,
  "--checkpoint-every", RUN.checkpointEvery, "--train-steps", String(updates), "--out-dir", outDir,
];

async function fillRun(page) {
  await page.selectOption("#device", "cpu");
  await page.selectOption("#method", RUN.method);
  await page.fill("#train-steps", String(RUN.updates));
  await page.fill("#steps", RUN.steps);
  await page.fill("#lr", RUN.lr);
  await page.fill("#refresh", RUN.refresh);
  await page.fill("#batch", RUN.batch);
  await page.fill("#preview", RUN.preview);
  await page.fill("#checkpoint-every", RUN.checkpointEvery);
}

const settled = (page) => page.waitForFunction(() => ["done", "error"].includes(document.body.dataset.state), null, { timeout: 600_000, polling: 50 });

async function pageState(page) {
  return page.evaluate(() => ({
    state: document.body.dataset.state,
    error: document.getElementById("error").textContent,
    updates: window.draft.updates,
    steps: window.draft.steps.map((s) => s.step),
  }));
}

async function downloadFrom(page, button) {
  const [dl] = await Promise.all([page.waitForEvent("download"), page.click(button)]);
  return new Uint8Array(await readFile(await dl.path()));
}

async function resumeAndRoundTrip() {
  if (!existsSync(DRAFT)) {
    fail(`no draft binary at ${DRAFT} for the checkpoint round trip: cargo build --release (or --draft PATH)`);
    return null;
  }
  const dir = await mkdtemp(join(tmpdir(), "draft-e2e-"));
  const out = { dir };
  draft(cliFlags(2, join(dir, "cli-2")));
  draft(cliFlags(RUN.updates, join(dir, "cli-full")));
  const cliFull = new Uint8Array(await readFile(join(dir, "cli-full/pytorch_lora_weights.safetensors")));

  const page = await browser.newPage({ viewport: { width: 1280, height: 1100 } });
  page.on("console", (m) => log(`resume page: console.${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => log(`resume page: error: ${e.message}`));
  await page.goto(url);
  await page.waitForSelector("body[data-state=idle]", { timeout: 60_000 });
  await fillRun(page);
  await page.evaluate(() => setTimeout(() => document.getElementById("train").click(), 0));
  // Reload as soon as the first checkpoint is kept: mid-run, as a closed tab would.
  await page.waitForFunction(() => window.draft.saved >= 2 || document.body.dataset.state === "error", null, { timeout: 600_000, polling: 20 });
  out.reloadedAfter = await page.evaluate(() => window.draft.updates);
  await page.reload();
  await page.waitForSelector("body[data-state=idle]", { timeout: 60_000 });
  out.offered = await page.isVisible("#kept");
  out.keptText = await page.textContent("#kept-text");
  // The kept checkpoint, as the page wrote it, for `draft train --resume`.
  const kept = await page.evaluate(async () => {
    const dir = await (await navigator.storage.getDirectory()).getDirectoryHandle("draft-run");
    const file = await (await dir.getFileHandle("checkpoint.safetensors")).getFile();
    return [...new Uint8Array(await file.arrayBuffer())];
  });
  await mkdir(join(dir, "page"), { recursive: true });
  await writeFile(join(dir, "page/checkpoint.safetensors"), Uint8Array.from(kept));
  await page.selectOption("#device", "cpu");
  await page.click("#resume");
  await settled(page);
  const resumed = await pageState(page);
  out.resumed = resumed;
  const resumedLora = await downloadFrom(page, "#download");

  // The same run uninterrupted, in the page.
  await page.reload();
  await page.waitForSelector("body[data-state=idle]", { timeout: 60_000 });
  await page.click("#discard");
  await fillRun(page);
  await page.evaluate(() => setTimeout(() => document.getElementById("train").click(), 0));
  await settled(page);
  const uninterrupted = await pageState(page);
  const pageFull = await downloadFrom(page, "#download");
  const pageCheckpoint = await downloadFrom(page, "#download-checkpoint");

  // `draft train`'s checkpoint after 2 updates, opened in the page and trained on.
  await page.setInputFiles("#checkpoint-file", join(dir, "cli-2/checkpoint.safetensors"));
  await page.waitForFunction(() => document.body.dataset.state === "done" && window.draft.info, null, { timeout: 600_000, polling: 50 });
  out.openedAt = await page.evaluate(() => window.draft.updates);
  await page.evaluate(() => setTimeout(() => document.getElementById("train").click(), 0));
  await settled(page);
  const fromCli = await pageState(page);
  const fromCliLora = await downloadFrom(page, "#download");

  // The page's kept checkpoint resumed by `draft train`, with no settings given.
  draft(["train", "--device", "cpu", "--resume", "--out-dir", join(dir, "page"), "--train-steps", String(RUN.updates)]);
  const cliFromPage = new Uint8Array(await readFile(join(dir, "page/pytorch_lora_weights.safetensors")));
  await page.close();

  out.resumedVsUninterrupted = loraDiff(resumedLora, pageFull);
  out.pageVsCli = loraDiff(pageFull, cliFull, true);
  out.pageCheckpointToCliVsCli = loraDiff(cliFromPage, cliFull, true);
  out.cliCheckpointToPageVsCli = loraDiff(fromCliLora, cliFull, true);
  out.checkpointBytes = pageCheckpoint.length;
  log(`resume: ${JSON.stringify(out)}`);

  for (const [what, s] of [["resumed run", resumed], ["uninterrupted run", uninterrupted], ["run from the CLI checkpoint", fromCli]]) {
    if (s.state !== "done" || s.updates !== RUN.updates) fail(`${what}: state ${s.state} at ${s.updates} updates (${s.error})`);
  }
  if (!out.offered) fail(`after the reload the page did not offer the kept run`);
  if (!(out.reloadedAfter < RUN.updates)) fail(`the reload came after the run ended (${out.reloadedAfter} updates)`);
  if (resumed.steps.length !== RUN.updates || resumed.steps.some((s, i) => s !== i + 1)) {
    fail(`the resumed page's history is ${JSON.stringify(resumed.steps)}`);
  }
  if (out.openedAt !== 2) fail(`the CLI checkpoint opened at update ${out.openedAt}, wanted 2`);
  if (out.resumedVsUninterrupted !== 0) fail(`the resumed run's LoRA differs from the uninterrupted run's by ${out.resumedVsUninterrupted}`);
  for (const k of ["pageVsCli", "pageCheckpointToCliVsCli", "cliCheckpointToPageVsCli"]) {
    if (!(out[k] <= CROSS_TOLERANCE)) fail(`${k}: LoRAs differ by ${out[k]} of the largest weight (tolerance ${CROSS_TOLERANCE})`);
  }
  return out;
}

// --- A learned reward picked in the page ------------------------------------------------------
// LAION aesthetic on the tiny CLIP fixture: a CLIP folder and an aesthetic MLP file picked as a
// user would, trained on the CPU backend; the evaluation set before training scores what the
// native session does (crates/draft-web/tests/common: AESTHETIC_NATIVE).
const AESTHETIC_NATIVE_BEFORE = -0.421916;
const fixtures = resolve(here, "../fixtures");

// A fresh page, idle, with the short run's settings filled in; `label` names it in the log.
async function newRunPage(label) {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1100 } });
  page.on("pageerror", (e) => log(`${label} page: error: ${e.message}`));
  await page.goto(url);
  await page.waitForSelector("body[data-state=idle]", { timeout: 60_000 });
  await fillRun(page);
  return page;
}

async function learnedReward() {
  const page = await newRunPage("learned-reward");
  await page.fill("#train-steps", "2");
  await page.fill("#checkpoint-every", "0");
  await page.uncheck("#reward-colorfulness");
  await page.check("#reward-laion-aesthetic");
  await page.setInputFiles("#reward-model-clip", join(fixtures, "clip-tiny"));
  await page.setInputFiles("#reward-model-laion-aesthetic", join(fixtures, "rewards/aesthetic-tiny.safetensors"));
  await page.evaluate(() => setTimeout(() => document.getElementById("train").click(), 0));
  await settled(page);
  const out = await page.evaluate(() => ({
    state: document.body.dataset.state,
    error: document.getElementById("error").textContent,
    reward: window.draft.info?.reward,
    before: window.draft.before?.reward,
    updates: window.draft.updates,
    limits: document.getElementById("limits").textContent,
  }));
  await page.close();
  log(`learned reward: ${JSON.stringify(out)}`);
  if (out.state !== "done" || out.updates !== 2) fail(`learned reward: state ${out.state} at ${out.updates} updates (${out.error})`);
  else {
    if (!/laion-aesthetic/.test(out.reward)) fail(`learned reward: the run trains on ${out.reward}`);
    if (!(Math.abs(out.before - AESTHETIC_NATIVE_BEFORE) <= 1e-4)) {
      fail(`learned reward: evaluation reward ${out.before} before training, natively ${AESTHETIC_NATIVE_BEFORE}`);
    }
  }
  if (!out.limits) fail("the page does not say what the adapter can hold");
  return out;
}

// --- A model folder picked in the page, its weights read by range ----------------------------
// sd1-tiny's folder picked as a user would: its .safetensors weights go to the worker as Files,
// read one tensor at a time (never whole in WebAssembly memory) and written to OPFS for the
// kept run; the page is reloaded mid-run and the run resumed from those OPFS files.
// The models kept in OPFS (draft-models/<id>) and each one's files.
const keptModels = (page) => page.evaluate(async () => {
  const tree = async (dir, prefix = "") => {
    const out = [];
    for await (const [name, h] of dir.entries()) {
      if (h.kind === "directory") out.push(...(await tree(h, `${prefix}${name}/`)));
      else out.push(`${prefix}${name}`);
    }
    return out;
  };
  const root = await navigator.storage.getDirectory();
  const models = await root.getDirectoryHandle("draft-models").catch(() => null);
  const out = {};
  if (models) for await (const [name, h] of models.entries()) out[name] = (await tree(h)).sort();
  return out;
});

// The page's word on the picked model before any run (#model-plan), once it names `name`.
async function planFor(page, name) {
  await page.waitForFunction((n) => document.getElementById("model-plan").textContent.startsWith(n), name, { timeout: 60_000, polling: 50 });
  return page.textContent("#model-plan");
}

async function pickedModelFolder() {
  const page = await newRunPage("model-folder");
  await page.fill("#train-steps", "3");
  await page.fill("#checkpoint-every", "1");
  await page.setInputFiles("#model-folder", join(fixtures, "sd1-tiny"));
  const plan = await planFor(page, "sd1-tiny");
  await page.evaluate(() => setTimeout(() => document.getElementById("train").click(), 0));
  await page.waitForFunction(() => window.draft.saved >= 1 || document.body.dataset.state === "error", null, { timeout: 600_000, polling: 20 });
  const out = { first: await pageState(page) };
  await page.reload();
  await page.waitForSelector("body[data-state=idle]", { timeout: 60_000 });
  out.keptText = await page.textContent("#kept-text");
  await page.selectOption("#device", "cpu");
  await page.click("#resume");
  await settled(page);
  out.resumed = await pageState(page);
  out.plan = plan;
  out.models = await keptModels(page);
  await page.close();
  log(`model folder: ${JSON.stringify(out)}`);
  // sd1-tiny in f32 on the CPU backend, which has no buffer limits.
  if (!/^sd1-tiny: [\d.]+ M parameters, about [\d.]+ MiB of weights in f32 on this device\. An update at 16×16 latents, batch 1, runs on the CPU/.test(plan)) fail(`the plan of a picked folder: ${plan}`);
  const kept = Object.entries(out.models);
  if (kept.length !== 1 || !kept[0][0].startsWith("sd1-tiny-") || !kept[0][1].includes("folder/unet/diffusion_pytorch_model.safetensors")) {
    fail(`the picked folder is not kept once in OPFS: ${JSON.stringify(out.models)}`);
  }
  if (out.first.state === "error") fail(`a picked model folder: ${out.first.error}`);
  else if (!/sd1-tiny/.test(out.keptText ?? "")) fail(`the kept run does not name the picked folder: ${out.keptText}`);
  else if (out.resumed.state !== "done" || out.resumed.updates !== 3) {
    fail(`the kept run of a picked folder, resumed from OPFS: state ${out.resumed.state} at ${out.resumed.updates} updates (${out.resumed.error})`);
  }
  return out;
}

// A single checkpoint file picked with a folder for its configs (sd1-tiny's own small
// tokenizer; real SD files need none): read by range, trained and kept in OPFS in place of the
// previous run's model, without the folder's weights. Alone, the file is refused before
// loading with the reason (sd1-tiny's text encoder is smaller than the standard tokenizer).
async function pickedSingleFile() {
  const page = await newRunPage("single-file");
  await page.fill("#train-steps", "1");
  await page.fill("#checkpoint-every", "1");
  await page.setInputFiles("#model-file", join(fixtures, "layouts/sd1-tiny.safetensors"));
  const out = { alone: await planFor(page, "sd1-tiny.safetensors") };
  await page.evaluate(() => setTimeout(() => document.getElementById("train").click(), 0));
  await settled(page);
  out.aloneRun = await pageState(page);
  await page.setInputFiles("#model-folder", join(fixtures, "sd1-tiny"));
  await page.evaluate(() => setTimeout(() => document.getElementById("train").click(), 0));
  await settled(page);
  out.run = await pageState(page);
  out.model = await page.evaluate(() => window.draft.info?.model);
  await page.waitForFunction(() => window.draft.saved >= 1, null, { timeout: 60_000, polling: 50 }).catch(() => {});
  out.models = await keptModels(page);
  await page.close();
  log(`single file: ${JSON.stringify(out)}`);
  if (!/vocab_size 1014/.test(out.aloneRun.error)) fail(`a lone sd1-tiny file with the standard tokenizer: ${JSON.stringify(out.aloneRun)}`);
  if (out.run.state !== "done" || out.run.updates !== 1 || out.model !== "sd1-tiny.safetensors") {
    fail(`a picked single file: ${JSON.stringify(out.run)} on ${out.model}`);
  }
  const kept = Object.entries(out.models);
  const files = kept[0]?.[1] ?? [];
  if (kept.length !== 1 || !files.includes("single/sd1-tiny.safetensors") || files.some((f) => f.startsWith("folder/") && f.endsWith(".safetensors"))) {
    fail(`the single file is not kept alone in OPFS: ${JSON.stringify(out.models)}`);
  }
  return out;
}

// --- A real-size model picked in the page (opt-in: --real-size DIR) ---------------------------
// DIR: the random SD-1.4-architecture pipeline of tests/fixtures/make_sd14_pipeline.py (f16,
// 2.1 GB; SD-1.4's UNet, VAE and CLIP ViT-L/14 text encoder), picked as a folder on WebGPU
// (SwiftShader) at 64×64 (8×8 latents; DRAFT_REAL_SIZE=128 for 16×16, which did not finish
// within an hour here): the plan before the run, WebAssembly memory after
// the load, the evaluation set before training against `draft train`'s on the CPU backend (the
// same seeds: its reward and diversity are functions of the sampled images), and one DRaFT-1
// update with SGD, whose LoRA is −lr × the gradient (B starts at zero), against native's.
const REAL = { steps: "2", size: process.env.DRAFT_REAL_SIZE ?? "64", lr: "0.01", prompts: ["a photo of a cat", "a photo of a dog"] };
// Measured 2026-12-07 (docs/web.md): 1.5e-7 and 4.8e-7 (reward, diversity), 5.3e-5 (LoRA).
const REAL_EVAL_TOLERANCE = 1e-4;
const REAL_LORA_TOLERANCE = 1e-3;
// WebAssembly memory after loading the 2.0 GiB folder: the worker test's bound for a load (one
// piece of a tensor in f32 and f16, 48 MiB, + 32 MiB of queued uploads + a 128 MiB budget =
// 208 MiB) over the module's memory before it (48 MiB in the worker test), with 128 MiB more for
// what the page holds beside the load. Measured: 125 MiB.
const REAL_WASM_BYTES = (48 + 208 + 128) * 2 ** 20;

async function realSize(dir) {
  const name = basename(resolve(dir));
  const out = { name };
  const nativeDir = await mkdtemp(join(tmpdir(), "draft-real-"));
  const t = Date.now();
  draft([
    "train", "--model", dir, "--device", "cpu", "--method", "draft-k", "--k", "1", "--steps", REAL.steps,
    "--batch", "1", "--height", REAL.size, "--width", REAL.size, "--optimizer", "sgd", "--lr", REAL.lr,
    "--preview", "2", "--eval-every", "1", "--checkpoint-every", "1", "--train-steps", "1",
    ...REAL.prompts.flatMap((p) => ["--prompt", p]), "--out-dir", nativeDir,
  ]);
  out.nativeSeconds = (Date.now() - t) / 1000;
  const nativeLora = new Uint8Array(await readFile(join(nativeDir, "pytorch_lora_weights.safetensors")));
  const ckpt = new Uint8Array(await readFile(join(nativeDir, "checkpoint.safetensors")));
  const n = Number(Buffer.from(ckpt).readBigUInt64LE(0));
  const meta = JSON.parse(Buffer.from(ckpt.subarray(8, 8 + n)).toString("utf8")).__metadata__;
  out.nativeBefore = JSON.parse(meta.before);

  const page = await browser.newPage({ viewport: { width: 1280, height: 1100 } });
  page.on("console", (m) => log(`real-size page: console.${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => log(`real-size page: error: ${e.message}`));
  await page.goto(url);
  await page.waitForSelector("body[data-state=idle]", { timeout: 60_000 });
  await page.selectOption("#device", "webgpu");
  await page.selectOption("#method", "draft-k");
  await page.fill("#k", "1");
  await page.fill("#train-steps", "1");
  await page.fill("#steps", REAL.steps);
  await page.fill("#batch", "1");
  await page.fill("#height", REAL.size);
  await page.fill("#width", REAL.size);
  await page.selectOption("#optimizer", "sgd");
  await page.fill("#lr", REAL.lr);
  await page.fill("#refresh", "1");
  await page.fill("#preview", "2");
  await page.fill("#checkpoint-every", "0");
  await page.fill("#prompts", REAL.prompts.join("\n"));
  await page.setInputFiles("#model-folder", dir);
  await page.dispatchEvent("#height", "change");
  await planFor(page, name);
  await page.waitForFunction(() => /latents/.test(document.getElementById("model-plan").textContent), null, { timeout: 60_000 });
  out.plan = await page.textContent("#model-plan");
  const started = Date.now();
  await page.evaluate(() => setTimeout(() => document.getElementById("train").click(), 0));
  // SwiftShader takes tens of minutes: say where the run is every minute.
  for (;;) {
    const state = await page.evaluate(() => document.body.dataset.state);
    if (["done", "error"].includes(state)) break;
    if (Date.now() - started > 7_200_000) break;
    log(`real size: ${state}: ${await page.textContent("#status")}`);
    await new Promise((r) => setTimeout(r, 60_000));
  }
  out.pageSeconds = (Date.now() - started) / 1000;
  out.run = await pageState(page);
  out.page = await page.evaluate(() => ({
    before: window.draft.before,
    wasmMemoryBytes: window.draft.info?.wasmMemoryBytes,
    weights: window.draft.info?.weights,
    seconds: window.draft.steps.map((s) => s.seconds),
  }));
  const pageLora = out.run.state === "done" ? await downloadFrom(page, "#download") : null;
  await page.close();
  const rel = (a, b) => Math.abs(a - b) / Math.max(Math.abs(b), 1e-12);
  out.beforeReward = rel(out.page.before?.reward, out.nativeBefore.reward);
  out.beforeDiversity = rel(out.page.before?.diversity, out.nativeBefore.diversity);
  out.lora = pageLora ? loraDiff(pageLora, nativeLora, true) : null;
  log(`real size: ${JSON.stringify(out)}`);
  const latents = REAL.size / 8;
  const planWords = new RegExp(`^[^:]+: 1\\.\\d\\d B parameters, about \\d+ MiB of weights in f(16|32) on this device\\. An update at ${latents}×${latents} latents, batch 1, fits this adapter's buffers\\. One update holds about [\\d.]+ GiB`);
  if (!planWords.test(out.plan)) {
    fail(`the plan of the real-size folder: ${out.plan}`);
  }
  if (out.run.state !== "done" || out.run.updates !== 1) fail(`the real-size run: state ${out.run.state} at ${out.run.updates} updates (${out.run.error})`);
  if (!(out.page.wasmMemoryBytes <= REAL_WASM_BYTES)) {
    fail(`WebAssembly memory after loading the real-size folder: ${out.page.wasmMemoryBytes} bytes, over ${REAL_WASM_BYTES}`);
  }
  if (!(out.beforeReward <= REAL_EVAL_TOLERANCE && out.beforeDiversity <= REAL_EVAL_TOLERANCE)) {
    fail(`the evaluation set before training differs from native's: reward ${out.beforeReward}, diversity ${out.beforeDiversity} relative`);
  }
  if (!(out.lora <= REAL_LORA_TOLERANCE)) fail(`the LoRA after one update differs from native's by ${out.lora} of its largest entry`);
  return out;
}

const server = await serve();
const url = `http://127.0.0.1:${server.address().port}/`;
const browser = await launch();
const t0 = Date.now();
const log = (m) => console.error(`[e2e ${((Date.now() - t0) / 1000).toFixed(1)} s] ${m}`);
try {
  if (args["real-size"]) {
    console.log(JSON.stringify({ realSize: await realSize(args["real-size"]) }));
    if (!process.exitCode) console.error("e2e: ok");
    await browser.close();
    server.close();
    process.exit(process.exitCode ?? 0);
  }
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
  // The page as the run left it (before the slider test resamples at other scales).
  await mkdir(dirname(args.screenshot), { recursive: true });
  await page.screenshot({ path: args.screenshot, fullPage: true });
  log(`screenshot: ${args.screenshot}`);
  // The LoRA-scale slider: moved again during its evaluation, the running one is cancelled
  // within a sampling step and the new scale sampled.
  let slider = null;
  if (stop?.state === "done") {
    const move = (v) => page.evaluate((v) => {
      const s = document.getElementById("scale");
      s.value = String(v);
      s.dispatchEvent(new Event("input"));
    }, v);
    await page.evaluate(() => { window.draft.progressEvents = 0; });
    await move(0.5);
    await page.waitForFunction(() => window.draft.progressEvents > 0, null, { timeout, polling: 20 });
    const moved = Date.now();
    await move(0);
    await page.waitForFunction(() => window.draft.scaleEvaluations.done + window.draft.scaleEvaluations.cancelled >= 1, null, { timeout, polling: 20 });
    const answered = (Date.now() - moved) / 1000;
    await page.waitForFunction(() => window.draft.scaleEvaluations.done >= 1, null, { timeout, polling: 50 });
    slider = await page.evaluate(() => ({
      ...window.draft.scaleEvaluations,
      error: document.getElementById("error").textContent,
      label: document.getElementById("scale-value").textContent,
    }));
    slider.secondsToAnswer = answered;
  }
  const resume = result.state === "done" ? await resumeAndRoundTrip() : null;
  const learned = result.state === "done" ? await learnedReward() : null;
  const modelFolder = result.state === "done" ? await pickedModelFolder() : null;
  const singleFile = result.state === "done" ? await pickedSingleFile() : null;

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
    // The slider moved during its evaluation: evaluations done and cancelled, and the seconds
    // from the second move to the first one's end.
    slider,
    // The run kept across a reload, and the checkpoint round trip with `draft train`.
    resume,
    // LAION aesthetic (tiny CLIP) picked in the page.
    learned,
    // sd1-tiny's folder picked in the page (weights read by range), kept and resumed.
    modelFolder,
    // sd1-tiny as a single file (with its folder's configs), kept in OPFS in place of the folder.
    singleFile,
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
    if (!slider || slider.cancelled !== 1 || slider.done !== 1 || slider.error || slider.label !== "0.00") {
      fail(`the slider moved during its evaluation: ${JSON.stringify(slider)} (wanted one cancelled, one done)`);
    } else if (!(slider.secondsToAnswer < 0.75 * figures.meanSecondsAfterFirst + 1)) {
      fail(`the slider's cancellation took ${slider.secondsToAnswer} s, an update takes ${figures.meanSecondsAfterFirst} s`);
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

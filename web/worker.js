// The trainer's thread: a dedicated module worker that owns the WebAssembly module and the
// run (WebGPU is available in workers; the CPU backend runs here too), so the page's thread only
// draws and never waits on an update. The page sends {id, method, args}; the worker answers
// {id, ok, value} or {id, ok: false, error}, one call at a time in the order received.
import init, { WebTrainer, ModelFolder, defaultPrompts, rewardNames } from "./pkg/draft_web.js";

const ready = init();
let trainer = null;
// Set to 1 by the page's Stop (a SharedArrayBuffer, where the page is cross-origin isolated):
// read after every sampling step, so Stop ends an update within one step.
let cancel = null;

function watchProgress() {
  trainer.onProgress((phase, done, total) => {
    self.postMessage({ progress: { phase, done, total } });
    return !(cancel && Atomics.load(cancel, 0) === 1);
  });
}

const handlers = {
  // What the page needs before any run: the default prompts and the rewards it can offer.
  hello: () => ({ prompts: defaultPrompts(), rewards: rewardNames() }),
  // A new run: the embedded model, or a picked folder's files ([path, bytes] pairs).
  async open({ options, folder }) {
    trainer?.free();
    trainer = null;
    const json = JSON.stringify(options);
    if (folder) {
      const f = new ModelFolder(folder.name);
      for (const [path, bytes] of folder.files) f.add(path, bytes);
      trainer = await WebTrainer.withModel(json, f);
    } else {
      trainer = await WebTrainer.embedded(json);
    }
    watchProgress();
    return trainer.info();
  },
  cancelFlag: ({ buffer }) => {
    cancel = new Int32Array(buffer);
  },
  start: () => run().start(),
  update: ({ total, evalEvery }) => run().update(total, evalEvery),
  finish: () => run().finish(),
  evaluate: ({ n, scale }) => run().evaluate(n, scale),
  lora: () => run().loraSafetensors(),
};

function run() {
  if (!trainer) throw new Error("no run: press Train first");
  return trainer;
}

// Pixel buffers and file bytes go back without a copy.
function transferables(value) {
  const out = [];
  const images = (v) => (v && Array.isArray(v.images) ? v.images.map((i) => i.buffer) : []);
  if (value instanceof Uint8Array) out.push(value.buffer);
  out.push(...images(value), ...images(value?.eval));
  return out;
}

// Calls run one after another: the Rust side refuses overlapping calls on one run.
let queue = Promise.resolve();
self.onmessage = (event) => {
  const { id, method, args } = event.data;
  queue = queue.then(async () => {
    try {
      await ready;
      const handler = handlers[method];
      if (!handler) throw new Error(`unknown call ${method}`);
      const value = await handler(args ?? {});
      self.postMessage({ id, ok: true, value }, transferables(value));
    } catch (e) {
      self.postMessage({ id, ok: false, error: e instanceof Error ? e.message : String(e) });
    }
  });
};

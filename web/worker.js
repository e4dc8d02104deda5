// The trainer's thread: a dedicated module worker that owns the WebAssembly module and the
// run (WebGPU is available in workers; the CPU backend runs here too), so the page's thread only
// draws and never waits on an update. The page sends {id, method, args}; the worker answers
// {id, ok, value} or {id, ok: false, error}, one call at a time in the order received.
//
// It also keeps the run in the browser's origin-private file system (OPFS), so that it
// survives a reload or a closed tab: draft-run/checkpoint.safetensors (the format of
// `draft train`'s checkpoint.safetensors, written whenever the run policy hands one back),
// draft-run/run.json (the options, the history the page draws, the model's name and id) and
// draft-run/rewards/… (the picked reward files). A picked model is kept once, apart from the
// runs, in draft-models/<id>/ (its folder's files under folder/, a single checkpoint file under
// single/, and model.json, written last), where <id> comes from its name and its files' names
// and sizes: a new run on the same model copies nothing, and a model no kept run uses is
// removed. Runs kept by an earlier page hold their model in draft-run/model/.
import init, { WebTrainer, RunFiles, defaultPrompts, rewardNames, learnedRewardNames, planRun } from "./pkg/draft_web.js";

const ready = init();
let trainer = null;
// Set to 1 by the page's Stop (a SharedArrayBuffer, where the page is cross-origin isolated):
// read after every sampling step, so Stop ends an update within one step.
let cancel = null;
// The open run as stored: {options, model, folder, step, history: {before, steps, evals}}.
let record = null;
// Why runs are not kept, when the browser has no usable OPFS.
let storeError = null;

const RUN_DIR = "draft-run";
const MODELS_DIR = "draft-models";

// --- OPFS --------------------------------------------------------------------------------

async function runDir(create) {
  const root = await navigator.storage.getDirectory();
  return root.getDirectoryHandle(RUN_DIR, { create });
}

async function fileHandle(dir, path, create) {
  const parts = path.split("/");
  let d = dir;
  for (const p of parts.slice(0, -1)) d = await d.getDirectoryHandle(p, { create });
  return d.getFileHandle(parts.at(-1), { create });
}

// Replaces the file whole: a writable stream writes to a swap file that becomes the file on
// close(), so a tab closed mid-write leaves the previous version.
async function writeFile(dir, path, bytes) {
  const w = await (await fileHandle(dir, path, true)).createWritable();
  await w.write(bytes);
  await w.close();
}

async function readFile(dir, path) {
  const file = await (await fileHandle(dir, path, false)).getFile();
  return new Uint8Array(await file.arrayBuffer());
}

// Every file under `dir` as [relative path, bytes]; with `byRange`, .safetensors files as
// `File`s (read by range as the model loads, never whole).
async function readTree(dir, prefix = "", byRange = false) {
  const out = [];
  for await (const [name, handle] of dir.entries()) {
    if (handle.kind === "directory") out.push(...(await readTree(handle, `${prefix}${name}/`, byRange)));
    else {
      const file = await handle.getFile();
      out.push([`${prefix}${name}`, byRange && name.endsWith(".safetensors") ? file : new Uint8Array(await file.arrayBuffer())]);
    }
  }
  return out;
}

// The kept run and, with `models`, every kept model (no run is left to use them).
async function forget({ models = true } = {}) {
  const root = await navigator.storage.getDirectory();
  await root.removeEntry(RUN_DIR, { recursive: true }).catch(() => {});
  if (models) await root.removeEntry(MODELS_DIR, { recursive: true }).catch(() => {});
}

async function saveRecord(dir) {
  await writeFile(dir, "run.json", new TextEncoder().encode(JSON.stringify(record)));
}

// A model file's bytes: a `File` (weights read by range) or the bytes themselves.
const byteSize = (d) => (d instanceof Blob ? d.size : d.byteLength);

// A picked model's identity in the store: its name and every file's path and size (FNV-1a
// over them; hashing the content would read gigabytes).
function modelId(model) {
  const key = JSON.stringify([
    model.folder?.name ?? null,
    (model.folder?.files ?? []).map(([p, d]) => [p, byteSize(d)]),
    model.single ? [model.single.name, model.single.file.size] : null,
  ]);
  let h = 0x811c9dc5;
  for (let i = 0; i < key.length; i++) h = Math.imul(h ^ key.charCodeAt(i), 0x01000193) >>> 0;
  const name = (model.single?.name ?? model.folder?.name ?? "model").replace(/[^\w.-]+/g, "_").slice(0, 60);
  return `${name}-${h.toString(16).padStart(8, "0")}`;
}

// The bytes a model's files take.
function modelBytes(model) {
  return (model.folder?.files ?? []).reduce((n, [, d]) => n + byteSize(d), 0) + (model.single?.file.size ?? 0);
}

// Keeps `model` ({folder, single}) in draft-models/<id>/ unless it is there already, after
// removing the models no run uses; refuses before copying anything when the origin's quota
// cannot hold it.
async function storeModel(model, id) {
  const root = await navigator.storage.getDirectory();
  const models = await root.getDirectoryHandle(MODELS_DIR, { create: true });
  for await (const [name] of models.entries()) {
    if (name !== id) await models.removeEntry(name, { recursive: true });
  }
  const dir = await models.getDirectoryHandle(id, { create: true });
  try {
    await fileHandle(dir, "model.json", false);
    return; // Kept already, whole (model.json is written last).
  } catch {
    // Not yet, or a copy cut short: copied again below.
  }
  const need = modelBytes(model);
  const { quota, usage } = (await navigator.storage.estimate?.()) ?? {};
  if (quota !== undefined && usage + need > quota) {
    await models.removeEntry(id, { recursive: true });
    const mib = (b) => `${Math.round(b / 2 ** 20)} MiB`;
    throw new Error(`the model needs ${mib(need)} of storage and this site has ${mib(Math.max(0, quota - usage))} free of its ${mib(quota)} quota, so it was not copied`);
  }
  // A `File` (a weights file read by range) is written by the browser from the file itself.
  for (const [path, data] of model.folder?.files ?? []) await writeFile(dir, `folder/${path}`, data);
  if (model.single) await writeFile(dir, `single/${model.single.name}`, model.single.file);
  const meta = { folder: model.folder?.name ?? null, single: model.single?.name ?? null, bytes: need };
  await writeFile(dir, "model.json", new TextEncoder().encode(JSON.stringify(meta)));
}

// The kept model `id` as {folder, single}, its weights as OPFS `File`s read by range.
async function keptModel(id) {
  const root = await navigator.storage.getDirectory();
  const dir = await (await root.getDirectoryHandle(MODELS_DIR)).getDirectoryHandle(id);
  const meta = JSON.parse(new TextDecoder().decode(await readFile(dir, "model.json")));
  const folder = meta.folder ? { name: meta.folder, files: await readTree(await dir.getDirectoryHandle("folder"), "", true) } : null;
  const single = meta.single ? { name: meta.single, file: await (await fileHandle(dir, `single/${meta.single}`, false)).getFile() } : null;
  return { folder, single };
}

// A new run replaces the stored one: its model (unless kept already) and reward files now, its
// checkpoints as they come. A model that cannot be kept leaves the run unkept.
async function storeNewRun(model, checkpoint, rewards) {
  await forget({ models: false });
  if (model) await storeModel(model, record.modelId);
  else await forget();
  const dir = await runDir(true);
  for (const r of rewards) {
    if (r.files) for (const [path, bytes] of r.files) await writeFile(dir, `rewards/${r.role}/${path}`, bytes);
    else await writeFile(dir, `rewards/${r.role}/weights`, r.bytes);
  }
  if (checkpoint) await writeFile(dir, "checkpoint.safetensors", checkpoint.bytes);
  await saveRecord(dir);
}

// Runs `f` on the store; a browser without OPFS (or out of quota) still trains, unsaved.
async function stored(f) {
  try {
    await f();
    storeError = null;
  } catch (e) {
    storeError = `this run is not kept in the browser (${e.message ?? e})`;
  }
}

// --- the run ------------------------------------------------------------------------------

function watchProgress() {
  trainer.onProgress((phase, done, total) => {
    self.postMessage({ progress: { phase, done, total } });
    return !(cancel && Atomics.load(cancel, 0) === 1);
  });
}

// What the WebGPU adapter can hold (Burn asks for the adapter's own limits), for the page to
// show and the run to check before loading; null without WebGPU.
let adapterInfo;
async function adapter() {
  if (adapterInfo !== undefined) return adapterInfo;
  adapterInfo = null;
  try {
    const a = await navigator.gpu?.requestAdapter({ powerPreference: "high-performance" });
    if (a) {
      adapterInfo = {
        maxBufferSize: a.limits.maxBufferSize,
        maxStorageBufferBindingSize: a.limits.maxStorageBufferBindingSize,
        shaderF16: a.features.has("shader-f16"),
        name: [a.info?.vendor, a.info?.architecture, a.info?.description].filter((x) => x).join(" "),
      };
    }
  } catch {
    // No adapter: the CPU backend.
  }
  return adapterInfo;
}

// The picked model ({folder: {name, files: [[path, bytes or File]]}, single: {name, file}},
// either or both) as the module's RunFiles, with the adapter's buffer limit.
async function modelFiles(model, options) {
  const files = new RunFiles();
  const folder = model?.folder;
  if (folder) {
    for (const [path, data] of folder.files) {
      if (data instanceof Blob) files.addModelSource(folder.name, path, data);
      else files.addModelFile(folder.name, path, data);
    }
  }
  if (model?.single) files.setModelCheckpoint(model.single.name, model.single.file);
  const limits = options.device === "webgpu" ? await adapter() : null;
  if (limits) files.setBufferLimit(Math.min(limits.maxStorageBufferBindingSize, limits.maxBufferSize));
  return files;
}

// rewards: [{role, name, files: [[path, bytes]]}] (a folder) or [{role, name, bytes,
// openClipConfig}] (a single weights file).
async function openRun({ options, model, checkpoint, rewards = [] }) {
  trainer?.free();
  trainer = null;
  record = null;
  const files = await modelFiles(model, options);
  if (checkpoint) files.setCheckpoint(checkpoint.name, checkpoint.bytes);
  for (const r of rewards) {
    if (r.files) for (const [path, bytes] of r.files) files.addRewardFile(r.role, r.name, path, bytes);
    else files.setRewardWeights(r.role, r.name, r.bytes, r.openClipConfig ?? undefined);
  }
  trainer = await WebTrainer.open(JSON.stringify(options), files);
  watchProgress();
  // WebAssembly memory only grows: its size once the model is loaded is the load's peak.
  return { ...trainer.info(), wasmMemoryBytes: (await ready).memory.buffer.byteLength };
}

function run() {
  if (!trainer) throw new Error("no run: press Train first");
  return trainer;
}

const handlers = {
  // What the page needs before any run: the default prompts, the rewards it can offer and the
  // run kept from an earlier visit (its record without the history, or null).
  async hello() {
    let kept = null;
    try {
      const dir = await runDir(false);
      const r = JSON.parse(new TextDecoder().decode(await readFile(dir, "run.json")));
      await fileHandle(dir, "checkpoint.safetensors", false);
      kept = { options: r.options, model: r.model, step: r.step, savedAt: r.savedAt };
    } catch {
      // Nothing kept, or no checkpoint written yet.
    }
    if (typeof navigator.storage?.getDirectory !== "function") {
      storeError = "this browser keeps no runs (it has no origin-private file system)";
    }
    return { prompts: defaultPrompts(), rewards: rewardNames(), learned: learnedRewardNames(), kept, storeError, adapter: await adapter() };
  },
  // What the picked model needs and whether it trains here, before any run (`ModelPlan`).
  async plan({ options, model }) {
    const a = options.device === "webgpu" ? await adapter() : null;
    return planRun(JSON.stringify(options), await modelFiles(model, options), Boolean(a?.shaderF16));
  },
  // A new run: the embedded model or a picked model ({folder, single}: a folder's files as
  // [path, bytes or File] pairs, a single checkpoint File), and a checkpoint ({name, bytes}) to
  // continue. Kept in OPFS when the options checkpoint.
  async open({ options, model, checkpoint, rewards = [] }) {
    const info = await openRun({ options, model, checkpoint, rewards });
    if (info.options.checkpointEvery > 0) {
      record = {
        options: info.options,
        model: model ? info.model : null,
        modelId: model ? modelId(model) : null,
        // How to rebuild the reward sources from rewards/<role>/.
        rewards: rewards.map((r) => ({ role: r.role, name: r.name, folder: Boolean(r.files), openClipConfig: r.openClipConfig ?? null })),
        step: info.step,
        savedAt: Date.now(),
        history: { before: info.before ?? null, steps: [], evals: [] },
      };
      await stored(() => storeNewRun(model, checkpoint, rewards));
    } else {
      // A run that is not kept still replaces the kept one: Resume must not bring back an
      // older run than the one last trained.
      await stored(forget);
    }
    return { ...info, storeError };
  },
  // The kept run, reopened from OPFS on `device`; resolves to its info and history.
  async resume({ device }) {
    const dir = await runDir(false);
    const kept = JSON.parse(new TextDecoder().decode(await readFile(dir, "run.json")));
    const checkpoint = { name: "checkpoint.safetensors (kept in this browser)", bytes: await readFile(dir, "checkpoint.safetensors") };
    let model = null;
    if (kept.modelId) model = await keptModel(kept.modelId);
    else if (kept.model) {
      // Kept by an earlier page: the folder inside the run.
      const modelDir = await dir.getDirectoryHandle("model");
      model = { folder: { name: kept.model, files: await readTree(modelDir, "", true) } };
    }
    const rewards = [];
    for (const r of kept.rewards ?? []) {
      const roleDir = await (await dir.getDirectoryHandle("rewards")).getDirectoryHandle(r.role);
      if (r.folder) rewards.push({ role: r.role, name: r.name, files: await readTree(roleDir) });
      else rewards.push({ role: r.role, name: r.name, bytes: await readFile(roleDir, "weights"), openClipConfig: r.openClipConfig });
    }
    const info = await openRun({ options: { ...kept.options, device }, model, checkpoint, rewards });
    record = kept;
    // The history up to the checkpoint (a closed tab may have drawn past it).
    const h = record.history;
    h.steps = h.steps.filter((s) => s.step <= info.step);
    h.evals = h.evals.filter((e) => e.update <= info.step);
    return { ...info, history: h, storeError };
  },
  forget: () => forget(),
  cancelFlag: ({ buffer }) => {
    cancel = new Int32Array(buffer);
  },
  async start() {
    const ev = await run().start();
    if (ev && record) {
      record.history.before = { reward: ev.reward, diversity: ev.diversity };
      record.history.evals = [{ update: 0, reward: ev.reward, diversity: ev.diversity }];
    }
    return ev;
  },
  async update({ total, evalEvery }) {
    const u = await run().update(total, evalEvery);
    if (record) {
      record.history.steps.push(u.metrics);
      if (u.eval) record.history.evals.push({ update: u.metrics.step, reward: u.eval.reward, diversity: u.eval.diversity });
      record.options.trainSteps = total;
      if (u.checkpoint) {
        record.step = u.metrics.step;
        record.savedAt = Date.now();
        const bytes = u.checkpoint;
        // The checkpoint first: a record never names a step its checkpoint has not reached.
        await stored(async () => {
          const dir = await runDir(true);
          await writeFile(dir, "checkpoint.safetensors", bytes);
          await saveRecord(dir);
        });
      }
    }
    u.saved = u.checkpoint ? (storeError ? null : u.metrics.step) : undefined;
    u.storeError = storeError;
    delete u.checkpoint;
    return u;
  },
  finish: () => run().finish(),
  evaluate: ({ n, scale }) => run().evaluate(n, scale),
  lora: () => run().loraSafetensors(),
  checkpoint: () => run().checkpoint(),
};

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

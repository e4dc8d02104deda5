// The page: a thin shell over draft-web's WebTrainer (crates/draft-web), which wraps the same
// Rust run (trainer + run policy: the evaluation before, the evaluation cadence, the early stop
// on diversity, the evaluation after) as the `draft` binary. The trainer lives in a Web Worker
// (worker.js): this thread only draws, so the page keeps repainting during an update. One
// optimizer update per awaited call; Stop ends the loop after the current update.

const worker = new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
const pending = new Map();
let nextCall = 0;
worker.onmessage = (event) => {
  if (event.data.progress) {
    showProgress(event.data.progress);
    return;
  }
  const { id, ok, value, error } = event.data;
  const call = pending.get(id);
  pending.delete(id);
  if (ok) call.resolve(value);
  else call.reject(new Error(error));
};
worker.onerror = (event) => {
  const error = new Error(`the trainer's worker failed: ${event.message ?? "unknown error"}`);
  for (const call of pending.values()) call.reject(error);
  pending.clear();
};

// Calls `method` in the worker; resolves to its result.
function call(method, args = {}, transfer = []) {
  return new Promise((resolve, reject) => {
    const id = nextCall++;
    pending.set(id, { resolve, reject });
    worker.postMessage({ id, method, args }, transfer);
  });
}

const $ = (id) => document.getElementById(id);
const state = {
  // The run's adapter and settings (`RunInfo`), once a run is open in the worker.
  info: null,
  updates: 0,
  // The longest time between two animation frames while training (ms): the page never freezes.
  maxFrameGap: 0,
  // Progress messages received from the worker (sampling and backward steps).
  progressEvents: 0,
  // Shared with the worker where the page is cross-origin isolated: Stop sets it to 1 and the
  // update stops within a sampling step. Elsewhere Stop waits for the update to end.
  cancel: typeof SharedArrayBuffer !== "undefined" && self.crossOriginIsolated
    ? new Int32Array(new SharedArrayBuffer(4))
    : null,
  settingsKey: null,
  stop: false,
  before: null,
  evals: [], // {update, reward, diversity}
  steps: [], // StepMetrics
  startedAt: 0,
  trainedSeconds: 0,
};
// Read by the end-to-end test (tests/e2e) and handy in the console.
window.draft = state;

// "Update 3 of 10: sampling step 12 of 50" with a bar over the update's steps.
function showProgress({ phase, done, total }) {
  state.progressEvents += 1;
  const row = $("progress-row");
  row.hidden = false;
  const bar = $("update-progress");
  bar.max = total;
  bar.value = done;
  const what = { sampling: "sampling step", backward: "backward step", evaluating: "evaluation set, sampling step" }[phase] ?? phase;
  const where = document.body.dataset.state === "training" ? `update ${state.updates + 1}: ` : "";
  $("progress-text").textContent = `${where}${what} ${done} of ${total}`;
}

function setState(s) {
  document.body.dataset.state = s;
}

function status(text) {
  $("status").textContent = text;
}

function showError(e) {
  const text = e instanceof Error ? e.message : String(e);
  $("error").textContent = text;
  $("error").hidden = false;
  setState("error");
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

const fmt = (x, digits = 4) => (x === undefined || x === null ? "–" : Number(x).toFixed(digits));

// Learned rewards and the weight files each needs (the CLI's --reward-model NAME=PATH).
const NEEDS = {
  "laion-aesthetic": ["clip", "laion-aesthetic"],
  "clip-score": ["clip"],
  pickscore: ["pickscore"],
  hpsv2: ["hpsv2"],
};
const MODEL_LABEL = {
  clip: "the CLIP folder",
  "laion-aesthetic": "the aesthetic MLP file",
  pickscore: "the PickScore folder",
  hpsv2: "the HPSv2 folder or checkpoint file",
};

function rewardRows(names, learned = false) {
  const box = $("rewards");
  const colour = box.querySelector('label[for="target-color"]');
  for (const name of names) {
    const row = document.createElement("div");
    row.className = learned ? "reward learned" : "reward";
    if (learned) row.title = `needs ${NEEDS[name].map((m) => MODEL_LABEL[m]).join(" and ")} (Reward model files)`;
    const check = document.createElement("input");
    check.type = "checkbox";
    check.id = `reward-${name}`;
    check.checked = name === "colorfulness";
    const label = document.createElement("label");
    label.htmlFor = check.id;
    label.textContent = name;
    const weight = document.createElement("input");
    weight.type = "number";
    weight.step = "any";
    weight.value = "1";
    weight.id = `weight-${name}`;
    weight.setAttribute("aria-label", `weight of ${name}`);
    row.append(check, label, weight);
    box.insertBefore(row, colour);
  }
}

function hexToRgb(hex) {
  const v = parseInt(hex.slice(1), 16);
  return [(v >> 16) & 255, (v >> 8) & 255, v & 255].map((c) => c / 255);
}

function num(id) {
  const v = Number($(id).value);
  if (!Number.isFinite(v)) throw new Error(`${$(id).labels[0].textContent}: not a number`);
  return v;
}

// An empty field: the default (left out of the options).
function optionalNum(id) {
  return $(id).value.trim() === "" ? undefined : num(id);
}

function readOptions(device) {
  const rewards = [...$("rewards").querySelectorAll(".reward")]
    .filter((row) => row.querySelector('input[type="checkbox"]').checked)
    .map((row) => `${row.querySelector("label").textContent}=${row.querySelector('input[type="number"]').value}`);
  if (rewards.length === 0) throw new Error("Pick at least one reward.");
  return {
    device,
    prompts: $("prompts").value.split("\n").map((p) => p.trim()).filter((p) => p),
    rewards,
    targetColor: hexToRgb($("target-color").value),
    method: $("method").value,
    k: num("k"),
    lvSamples: num("lv-samples"),
    lr: num("lr"),
    trainSteps: num("train-steps"),
    steps: num("steps"),
    batch: num("batch"),
    height: optionalNum("height"),
    width: optionalNum("width"),
    optimizer: $("optimizer").value,
    seed: num("seed"),
    preview: num("preview"),
    evalEvery: num("refresh"),
    checkpointEvery: num("checkpoint-every"),
  };
}

// The form showing a run's options (a resumed or opened checkpoint's settings).
function fillForm(o) {
  $("method").value = o.method;
  $("k").value = o.k;
  $("lv-samples").value = o.lvSamples;
  $("lr").value = o.lr;
  $("train-steps").value = o.trainSteps;
  $("steps").value = o.steps;
  $("batch").value = o.batch;
  $("height").value = o.height ?? "";
  $("width").value = o.width ?? "";
  $("optimizer").value = o.optimizer ?? "adamw";
  $("seed").value = o.seed;
  $("preview").value = o.preview;
  $("refresh").value = o.evalEvery;
  $("checkpoint-every").value = o.checkpointEvery;
  $("prompts").value = o.prompts.join("\n");
  const weights = new Map(o.rewards.map((spec) => {
    const [name, w] = spec.split("=");
    return [name, w ?? "1"];
  }));
  for (const row of $("rewards").querySelectorAll(".reward")) {
    const name = row.querySelector("label").textContent;
    row.querySelector('input[type="checkbox"]').checked = weights.has(name);
    if (weights.has(name)) row.querySelector('input[type="number"]').value = weights.get(name);
  }
  const missing = [...weights.keys()].filter((n) => !$(`reward-${n}`));
  if (missing.length) throw new Error(`the run trains on ${missing.join(", ")}, which this page does not offer`);
  const hex = (c) => Math.round(c * 255).toString(16).padStart(2, "0");
  $("target-color").value = `#${o.targetColor.map(hex).join("")}`;
}

// What identifies a run among the form's settings: a change starts a new run; more updates,
// the refresh or the checkpoint rate continue this one.
function settingsKey() {
  return JSON.stringify([
    { ...readOptions($("device").value), trainSteps: 0, evalEvery: 0, checkpointEvery: 0 },
    $("model-folder").files.length,
    $("model-file").files[0]?.name ?? null,
    [...document.querySelectorAll("#reward-models input[type=file]")].map((i) => [...i.files].map((f) => f.name).join()),
  ]);
}

// A picked folder as {name, files: [[path, bytes or File]]}. With `byRange`, its .safetensors
// files stay `File`s, which the worker reads one tensor at a time (a model's weights are never
// whole in memory: an SD-1.5 folder is 2–4 GB, WebAssembly's memory 4 GiB at most).
async function readFolder(input, byRange = false) {
  const files = [...input.files];
  if (files.length === 0) return null;
  const name = files[0].webkitRelativePath.split("/")[0] || "picked folder";
  const rel = (f) => f.webkitRelativePath.split("/").slice(1).join("/") || f.name;
  // Only what a pipeline or reward model needs: configs, tokenizer files, safetensors weights;
  // PyTorch weights only where a folder has no safetensors (the run then says how to convert).
  const hasSafetensors = files.some((f) => f.name.endsWith(".safetensors"));
  const wanted = hasSafetensors ? /\.(json|txt|safetensors)$/ : /\.(json|txt|safetensors|bin|pt|pth|ckpt)$/;
  const out = [];
  for (const f of files) {
    if (!wanted.test(rel(f))) continue;
    out.push([rel(f), byRange && f.name.endsWith(".safetensors") ? f : new Uint8Array(await f.arrayBuffer())]);
  }
  return { name, files: out };
}

// The weight files of the learned rewards picked in the form (those the run needs, and the
// tokenizer folder when given): [{role, name, files}] or [{role, name, bytes, openClipConfig}].
async function readRewardModels(rewards) {
  const names = rewards.map((spec) => spec.split("=")[0]);
  const roles = new Set(names.flatMap((n) => NEEDS[n] ?? []));
  if ($("reward-model-tokenizer").files.length) roles.add("tokenizer");
  const out = [];
  for (const role of roles) {
    const folder = $(`reward-model-${role}`)?.webkitdirectory ? await readFolder($(`reward-model-${role}`)) : null;
    if (folder) {
      out.push({ role, ...folder });
      continue;
    }
    // A single file: the aesthetic MLP, or an HPSv2 checkpoint (with its open_clip_config.json).
    const picked = [...($(`reward-model-${role}-file`) ?? $(`reward-model-${role}`)).files];
    const weights = picked.find((f) => !f.name.endsWith(".json"));
    if (!weights) {
      const who = names.filter((n) => (NEEDS[n] ?? []).includes(role));
      throw new Error(`${who.join(", ")} needs ${MODEL_LABEL[role]}: pick it under "Reward model files".`);
    }
    const config = picked.find((f) => f.name.endsWith(".json"));
    out.push({
      role,
      name: weights.name,
      bytes: new Uint8Array(await weights.arrayBuffer()),
      openClipConfig: config ? await config.text() : null,
    });
  }
  return out;
}

// The picked model: {folder, single} (a folder, a single checkpoint File, or both: the folder
// then gives the file its configs and tokenizer, and its own weights are left out), or null for
// the embedded one.
async function readModel() {
  const single = $("model-file").files[0] ?? null;
  let folder = await readFolder($("model-folder"), true);
  if (folder) folder = { ...folder, files: pipelineFiles(folder.files) };
  if (single && folder) folder = { ...folder, files: folder.files.filter(([p]) => /\.(json|txt)$/.test(p)) };
  if (!single && !folder) return null;
  return { folder, single: single ? { name: single.name, file: single } : null };
}

// Of a picked pipeline folder, what the run loads (and OPFS keeps): model_index.json and the
// unet, vae, text_encoder, tokenizer and scheduler folders — not a safety checker (1.2 GB in
// SD-1.5's repository) — and of a component's weights, the plain files where it has them (the
// run reads those; an fp16 variant beside them would double the copy).
function pipelineFiles(files) {
  const kept = files.filter(([p]) => p === "model_index.json" || /^(unet|vae|text_encoder|tokenizer|scheduler)\//.test(p));
  const component = (p) => p.split("/")[0];
  // `name.fp16.safetensors`, `name.fp16-00001-of-00002.safetensors`, `name.safetensors.index.fp16.json`…
  const weights = /\.(safetensors|bin)(\.index\.json)?$/;
  const isVariant = (p) => /\.[\w-]+\.(safetensors|bin)(\.index\.json)?$/.test(p.replace(/-\d{5}-of-\d{5}/, ""));
  const plain = new Set(kept.filter(([p]) => weights.test(p) && !isVariant(p)).map(([p]) => component(p)));
  return kept.filter(([p]) => !(isVariant(p) && plain.has(component(p))));
}

// What the picked model needs on the chosen device, said before any run (the worker reads its
// configs and safetensors headers only): its size, its weights' memory, and whether an update
// at its size fits this adapter — or which tensor passes which limit.
let planAsked = 0;
async function showPlan() {
  const asked = ++planAsked;
  const model = await readModel().catch(() => null);
  let text = "";
  try {
    const device = deviceKind();
    const p = await call("plan", { options: readOptions(device), model });
    const mib = (b) => `${(b / 2 ** 20).toFixed(b < 2 ** 24 ? 1 : 0)} MiB`;
    const params = p.parameters >= 1e8 ? `${(p.parameters / 1e9).toFixed(2)} B` : `${(p.parameters / 1e6).toFixed(1)} M`;
    text = `${p.model}: ${params} parameters, about ${mib(p.weightsBytes)} of weights in ${p.weightsDtype} on this device. `;
    const update = p.latents ? `An update at ${p.latents[0]}×${p.latents[1]} latents, batch ${p.batch},` : `An update, batch ${p.batch},`;
    const gib = (b) => `${(b / 2 ** 30).toFixed(b < 2 ** 30 ? 2 : 1)} GiB`;
    const step = p.stepBytes ? ` One update holds about ${gib(p.stepBytes)} with the weights (an estimate, by arithmetic).` : "";
    text += !p.trains
      ? `It does not train here: ${p.why}`
      : device === "webgpu"
        ? `${update} fits this adapter's buffers.${step}`
        : `${update} runs on the CPU backend, which has no buffer limits.${step}`;
  } catch (e) {
    text = `This model cannot be read: ${e.message ?? e}`;
  }
  if (asked === planAsked) {
    $("model-plan").textContent = text;
    $("model-plan").dataset.trains = String(!/does not train|cannot be read/.test(text));
  }
}

// Opens a run in the worker (continuing `checkpoint`, {name, bytes}, when given); resolves to
// its `RunInfo`.
async function createTrainer(options, checkpoint) {
  const model = await readModel();
  const folder = model?.folder;
  // A checkpoint's own rewards decide which files it needs.
  const rewards = await readRewardModels(checkpoint ? await checkpointRewards(checkpoint.bytes) : options.rewards);
  const transfer = [
    ...(folder ? folder.files.filter(([, b]) => b instanceof Uint8Array).map(([, b]) => b.buffer) : []),
    ...rewards.flatMap((r) => (r.files ? r.files.map(([, b]) => b.buffer) : [r.bytes.buffer])),
  ];
  return call("open", { options, model, checkpoint, rewards }, transfer);
}

// The reward specs in a checkpoint's metadata (its `config`), read from the safetensors header.
async function checkpointRewards(bytes) {
  try {
    const n = Number(new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(0, true));
    const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n)));
    return JSON.parse(header.__metadata__.config).rewards;
  } catch {
    return []; // the run reports what is wrong with the file
  }
}

async function openTrainer(checkpoint = null) {
  const want = $("device").value;
  const hasGpu = "gpu" in navigator;
  if (want === "webgpu" && !hasGpu) {
    throw new Error("This browser has no WebGPU. Use Chrome or Edge 113+, or pick the CPU device.");
  }
  const device = want === "auto" ? (hasGpu ? "webgpu" : "cpu") : want;
  try {
    return await createTrainer(readOptions(device), checkpoint);
  } catch (e) {
    if (want !== "auto" || device !== "webgpu") throw e;
    status(`WebGPU failed (${e.message}); falling back to the CPU backend.`);
    return createTrainer(readOptions("cpu"), checkpoint);
  }
}

function deviceKind() {
  const want = $("device").value;
  return want === "auto" ? ("gpu" in navigator ? "webgpu" : "cpu") : want;
}

// A run just opened in the worker: the page's state starts from its info (and the history a
// kept run carries).
function adoptRun(info, history = null) {
  state.info = info;
  // A new run replaces the kept one.
  $("kept").hidden = true;
  fillForm(info.options);
  state.settingsKey = settingsKey();
  state.steps = history?.steps ?? [];
  state.evals = history?.evals ?? [];
  state.before = history?.before ?? info.before ?? null;
  if (state.before && !state.evals.some((e) => e.update === 0)) {
    state.evals.unshift({ update: 0, reward: state.before.reward, diversity: state.before.diversity });
  }
  state.updates = info.step;
  state.trainedSeconds = state.steps.reduce((a, s) => a + s.seconds, 0);
  showAdapter(info);
  showFigures();
  showStore(info.storeError);
  if (info.notes?.length) status(info.notes.join(" "));
}

function showStore(error) {
  $("kept-note").textContent = error
    ? `Not kept: ${error}.`
    : $("checkpoint-every").value > 0 ? "This run is kept in this browser: a reload offers to resume it." : "";
}

function showAdapter(info) {
  const rows = [
    ["Model", info.model],
    ["Device", `${info.device}, weights and sampling in ${info.weights}`],
    ["Method", info.method],
    ["Reward", info.reward],
    ["LoRA", `rank ${info.rank}, alpha ${info.alpha}, ${info.loraLayers} layers (${info.loraTargets.join(", ")}), ${info.loraParams.toLocaleString()} parameters`],
    ["Batch", `${info.batch} images × ${info.steps} DDIM steps, lr ${info.lr}`],
    ["Prompts", String(info.prompts)],
  ];
  if (info.wasmMemoryBytes) rows.push(["WebAssembly memory", `${(info.wasmMemoryBytes / 2 ** 20).toFixed(0)} MiB after loading (the model's weights live on the device)`]);
  const dl = $("adapter");
  dl.replaceChildren();
  for (const [k, v] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    dl.append(dt, dd);
  }
}

function showGrid(ev) {
  const grid = $("grid");
  grid.replaceChildren();
  ev.images.forEach((pixels, i) => {
    const item = document.createElement("figure");
    item.setAttribute("role", "listitem");
    const canvas = document.createElement("canvas");
    canvas.width = ev.width;
    canvas.height = ev.height;
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", `sample ${i + 1}: ${ev.prompts[i]}`);
    canvas.getContext("2d").putImageData(new ImageData(pixels, ev.width, ev.height), 0, 0);
    const cap = document.createElement("figcaption");
    cap.textContent = `${ev.prompts[i]} (seed ${(i % 2) + 1})`;
    item.append(canvas, cap);
    grid.append(item);
  });
}

function showFigures() {
  const last = state.evals.at(-1);
  $("updates").textContent = String(state.steps.length);
  if (state.before) {
    $("eval-reward").textContent = `${fmt(state.before.reward)} → ${fmt(last?.reward)}`;
    $("diversity").textContent = `${fmt(state.before.diversity, 3)} → ${fmt(last?.diversity, 3)}`;
  }
  const s = state.steps.at(-1);
  if (s) {
    $("batch-reward").textContent = `${fmt(s.reward_mean)} ± ${fmt(s.reward_std)} (loss ${fmt(s.loss)}, gradient norm ${Number(s.grad_norm).toExponential(2)})`;
    const rate = state.steps.length / state.trainedSeconds;
    $("speed").textContent = `${rate.toFixed(3)} updates/s (${(1 / rate).toFixed(1)} s per update)`;
  }
  drawCurve();
}

// "Nice" tick values covering [lo, hi]: steps of 1, 2 or 5 × 10^k, about `n` of them.
function ticks(lo, hi, n) {
  const raw = (hi - lo) / Math.max(n, 1);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return { values: out, step };
}

function drawCurve() {
  const svg = $("curve");
  // Plot area inside the 400 × 160 view box: room for the y labels on the left, the x labels
  // and the axis title below, the legend on top.
  const W = 400, H = 160, left = 46, right = 8, top = 18, bottom = 30;
  const pts = state.steps.map((s) => [s.step, s.reward_mean]);
  const evs = state.evals.map((e) => [e.update, e.reward]);
  const all = [...pts, ...evs];
  if (all.length === 0) return;
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const [x0, x1] = [0, Math.max(...xs, 1)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const yt = ticks(y0, y1, 4);
  y0 = Math.min(y0, yt.values[0] ?? y0);
  y1 = Math.max(y1, yt.values.at(-1) ?? y1);
  const xt = ticks(x0, x1, 5);
  const X = (x) => left + ((x - x0) / (x1 - x0)) * (W - left - right);
  const Y = (y) => H - bottom - ((y - y0) / (y1 - y0)) * (H - top - bottom);
  const digits = Math.max(0, -Math.floor(Math.log10(yt.step)));
  const parts = [];
  for (const v of yt.values) {
    parts.push(`<line x1="${left}" x2="${W - right}" y1="${Y(v)}" y2="${Y(v)}" class="grid"/>`);
    parts.push(`<text x="${left - 4}" y="${Y(v) + 3}" class="tick" text-anchor="end">${v.toFixed(digits)}</text>`);
  }
  for (const v of xt.values.filter((v) => Number.isInteger(v))) {
    parts.push(`<line x1="${X(v)}" x2="${X(v)}" y1="${H - bottom}" y2="${H - bottom + 3}" class="axis"/>`);
    parts.push(`<text x="${X(v)}" y="${H - bottom + 13}" class="tick" text-anchor="middle">${v}</text>`);
  }
  parts.push(`<line x1="${left}" x2="${W - right}" y1="${H - bottom}" y2="${H - bottom}" class="axis"/>`);
  parts.push(`<line x1="${left}" x2="${left}" y1="${top}" y2="${H - bottom}" class="axis"/>`);
  parts.push(`<text x="${(left + W - right) / 2}" y="${H - 3}" class="label" text-anchor="middle">update</text>`);
  parts.push(`<text x="10" y="${(top + H - bottom) / 2}" class="label" text-anchor="middle" transform="rotate(-90 10 ${(top + H - bottom) / 2})">reward</text>`);
  parts.push(...pts.map(([x, y]) => `<circle cx="${X(x)}" cy="${Y(y)}" r="2" class="dot"/>`));
  parts.push(`<polyline points="${evs.map(([x, y]) => `${X(x)},${Y(y)}`).join(" ")}" class="line"/>`);
  parts.push(...evs.map(([x, y]) => `<circle cx="${X(x)}" cy="${Y(y)}" r="2.5" class="eval-dot"/>`));
  // Legend.
  parts.push(`<circle cx="${left + 6}" cy="8" r="2.5" class="dot"/><text x="${left + 12}" y="11" class="tick">batch reward</text>`);
  parts.push(`<line x1="${left + 100}" x2="${left + 116}" y1="8" y2="8" class="line"/><text x="${left + 120}" y="11" class="tick">evaluation-set reward</text>`);
  svg.innerHTML = parts.join("");
  const last = state.evals.at(-1);
  svg.setAttribute("aria-label",
    `Reward curve: ${pts.length} updates; evaluation reward ${fmt(state.before?.reward)} before, ${fmt(last?.reward)} at update ${last?.update ?? 0}.`);
}

async function evaluate(scale = 1) {
  const n = num("preview");
  const ev = await call("evaluate", { n, scale });
  showGrid(ev);
  return ev;
}

function recordEval(update, ev) {
  showGrid(ev);
  state.evals.push({ update, reward: ev.reward, diversity: ev.diversity });
  showFigures();
}

const yieldToPage = () => new Promise((resolve) => setTimeout(resolve, 0));

// Runs `f` with the form locked and Stop live; errors go to the alert line.
async function busy(f) {
  clearError();
  $("train").disabled = true;
  $("resume").disabled = true;
  $("open-checkpoint").disabled = true;
  $("stop").disabled = false;
  $("scale").disabled = true;
  state.stop = false;
  try {
    await f();
  } catch (e) {
    showError(e);
    status(`${state.info ? "Training" : "Opening the run"} failed.`);
  } finally {
    $("train").disabled = false;
    $("resume").disabled = false;
    $("open-checkpoint").disabled = false;
    $("stop").disabled = true;
    $("progress-row").hidden = true;
    const trained = state.info && state.updates > 0;
    $("download").disabled = !trained;
    $("download-checkpoint").disabled = !state.info;
    $("scale").disabled = !trained;
    $("scale").value = "1";
    $("scale-value").textContent = "1.00";
  }
}

async function train(event) {
  event.preventDefault();
  await busy(async () => {
    // A new run when a setting changes; more updates, or the refresh rate, continue this one.
    if (!state.info || settingsKey() !== state.settingsKey) {
      setState("loading");
      status("Loading the model…");
      state.info = null;
      adoptRun(await openTrainer());
    }
    await trainLoop();
  });
}

// The run kept in this browser (OPFS): reopened where its last checkpoint left it, then trained
// on to its planned updates.
async function resumeKept() {
  $("kept").hidden = true;
  await busy(async () => {
    setState("loading");
    status("Reopening the kept run…");
    state.info = null;
    const r = await call("resume", { device: deviceKind() });
    adoptRun(r, r.history);
    status(`Resumed at update ${r.step}.`);
    await trainLoop();
  });
}

// A checkpoint file (`draft train`'s or this page's): the run continues from it with its
// settings on the model picked above (or the embedded one). Train goes on from there.
async function openCheckpoint() {
  const file = $("checkpoint-file").files[0];
  if (!file) return;
  await busy(async () => {
    setState("loading");
    status(`Opening ${file.name}…`);
    state.info = null;
    const info = await openTrainer({ name: file.name, bytes: new Uint8Array(await file.arrayBuffer()) });
    adoptRun(info);
    status(`Opened ${file.name} at update ${info.step}: press Train to continue to ${info.options.trainSteps} updates.`);
    setState("done");
  });
  $("checkpoint-file").value = "";
}

async function trainLoop() {
  if (!state.before) {
    status("Sampling the evaluation set before training…");
    const ev = await call("start");
    if (ev) {
      state.before = { reward: ev.reward, diversity: ev.diversity };
      recordEval(0, ev);
    }
  }
  setState("training");
  if (state.cancel) Atomics.store(state.cancel, 0, 0);
  const total = num("train-steps");
  const refresh = num("refresh");
  while (!state.stop && state.updates < total) {
    status(`Training: update ${state.updates + 1} of ${total}…`);
    // One update, then the evaluation the run policy asks for (every `refresh` and the last).
    let u;
    try {
      u = await call("update", { total, evalEvery: refresh });
    } catch (e) {
      // Stop within the update: nothing changed, the next Train redoes it.
      if (state.stop && e.message === "cancelled") break;
      throw e;
    }
    // The update's own time (the evaluation the same call may add is not training).
    state.trainedSeconds += u.metrics.seconds;
    state.updates = u.metrics.step;
    state.steps.push(u.metrics);
    if (u.saved) state.saved = u.saved;
    if (u.storeError) showStore(u.storeError);
    showFigures();
    if (u.eval) recordEval(u.metrics.step, u.eval);
    if (u.collapsed) {
      status(`Update ${u.metrics.step}: the evaluation set's diversity fell to ${fmt(u.collapsed[1], 3)} from ${fmt(u.collapsed[0], 3)}; stopped early.`);
      break;
    }
    if (u.done) break;
    await yieldToPage();
  }
  if (state.evals.at(-1)?.update !== state.updates) {
    recordEval(state.updates, await call("finish"));
  }
  const last = state.evals.at(-1);
  if (!last) throw new Error("no evaluation set");
  status(`${state.stop ? "Stopped" : "Done"} after ${state.updates} updates: evaluation reward ${fmt(state.before?.reward)} → ${fmt(last.reward)}.`);
  setState("done");
}

function save(bytes, name) {
  const url = URL.createObjectURL(new Blob([bytes], { type: "application/octet-stream" }));
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  a.click();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

async function download() {
  try {
    save(await call("lora"), "pytorch_lora_weights.safetensors");
  } catch (e) {
    showError(e);
  }
}

// `draft train`'s checkpoint format: `draft train --resume --out-dir DIR` continues it once it
// is DIR/checkpoint.safetensors.
async function downloadCheckpoint() {
  try {
    save(await call("checkpoint"), "checkpoint.safetensors");
  } catch (e) {
    showError(e);
  }
}

// Offers the run an earlier visit kept (OPFS).
function offerKept(kept) {
  if (!kept) return;
  const o = kept.options;
  const when = kept.savedAt ? new Date(kept.savedAt).toLocaleString() : "earlier";
  $("kept-text").textContent = `A run is kept from ${when}: ${o.method} on ${kept.model ?? "shapes-32"}, ` +
    `update ${kept.step} of ${o.trainSteps}, rewards ${o.rewards.join(" + ")}.`;
  $("kept").hidden = false;
}

// The evaluation set at the slider's LoRA scale. Moving the slider again cancels the running
// evaluation within a sampling step (through the shared Stop flag) and samples the new scale.
let scaleBusy = false;
let scaleWanted = null;
state.scaleEvaluations = { done: 0, cancelled: 0 };
async function onScale() {
  const s = Number($("scale").value);
  $("scale-value").textContent = s.toFixed(2);
  scaleWanted = s;
  if (scaleBusy) {
    if (state.cancel) Atomics.store(state.cancel, 0, 1);
    return; // the loop below picks up the latest value
  }
  scaleBusy = true;
  try {
    while (scaleWanted !== null) {
      const scale = scaleWanted;
      scaleWanted = null;
      if (state.cancel) Atomics.store(state.cancel, 0, 0);
      status(`Sampling with the LoRA at scale ${scale.toFixed(2)}…`);
      try {
        const ev = await evaluate(scale);
        state.scaleEvaluations.done += 1;
        status(`LoRA scale ${scale.toFixed(2)}: evaluation reward ${fmt(ev.reward)}.`);
      } catch (e) {
        if (e.message !== "cancelled" || scaleWanted === null) throw e;
        state.scaleEvaluations.cancelled += 1;
      }
    }
  } catch (e) {
    showError(e);
  } finally {
    scaleBusy = false;
    $("progress-row").hidden = true;
  }
}

// Records the longest gap between animation frames while training: with the trainer in the
// worker it stays a frame or two (the e2e test asserts it).
function watchFrames() {
  let last = performance.now();
  const tick = (now) => {
    if (document.body.dataset.state === "training") state.maxFrameGap = Math.max(state.maxFrameGap, now - last);
    last = now;
    requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
}

async function main() {
  let hello;
  try {
    hello = await call("hello");
  } catch (e) {
    showError(`Cannot load the WebAssembly module: ${e.message ?? e}`);
    return;
  }
  watchFrames();
  rewardRows(hello.rewards);
  rewardRows(hello.learned, true);
  $("prompts").value = hello.prompts.join("\n");
  if (!("gpu" in navigator)) {
    $("device").value = "cpu";
    status("This browser has no WebGPU: training will run on the CPU backend in WebAssembly, " +
      "which is much slower. Chrome and Edge 113+ have WebGPU.");
  } else {
    status("Ready. Pick settings and press Train.");
  }
  $("settings").addEventListener("submit", train);
  if (state.cancel) await call("cancelFlag", { buffer: state.cancel.buffer });
  $("stop").addEventListener("click", () => {
    state.stop = true;
    if (state.cancel) Atomics.store(state.cancel, 0, 1);
    status(state.cancel ? "Stopping…" : "Stopping after the current update…");
  });
  $("download").addEventListener("click", download);
  $("download-checkpoint").addEventListener("click", downloadCheckpoint);
  $("resume").addEventListener("click", resumeKept);
  $("discard").addEventListener("click", async () => {
    $("kept").hidden = true;
    await call("forget").catch(showError);
  });
  $("checkpoint-file").addEventListener("change", openCheckpoint);
  for (const id of ["model-folder", "model-file", "device", "batch", "height", "width"]) $(id).addEventListener("change", showPlan);
  showPlan();
  $("open-checkpoint").addEventListener("click", () => $("checkpoint-file").click());
  offerKept(hello.kept);
  if (hello.storeError) showStore(hello.storeError);
  $("scale").addEventListener("input", onScale);
  $("train").disabled = false;
  $("open-checkpoint").disabled = false;
  showLimits(hello.adapter);
  setState("idle");
}

// What the WebGPU adapter can hold; the run refuses a model, reward or batch over it.
function showLimits(a) {
  const mib = (b) => `${(b / 2 ** 20).toFixed(0)} MiB`;
  $("limits").textContent = a
    ? `WebGPU adapter${a.name ? ` (${a.name})` : ""}: maxBufferSize ${mib(a.maxBufferSize)}, ` +
      `maxStorageBufferBindingSize ${mib(a.maxStorageBufferBindingSize)}, shader-f16 ${a.shaderF16 ? "yes" : "no"}. ` +
      "A model, reward model or batch needing a larger buffer is refused before loading; " +
      `weights are kept in ${a.shaderF16 ? "f16" : "f32"}.`
    : "No WebGPU adapter: the CPU backend has no buffer limits (but is slow).";
}

main();

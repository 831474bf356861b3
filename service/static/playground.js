// LESA playground: a plain client of this server's public API (no framework, no CDN).
//
// Images run as jobs (POST /v1/images/jobs) rather than through the synchronous endpoint so the
// page can show progress and cancel them (an edit sends the same route its multipart form); videos
// are OpenAI video jobs (with an `input_reference` file to start from). Validation is left to
// the server on purpose: the page shows the server's own message next to the field it names
// (error.param), so what users see here is exactly what API clients get.
"use strict";

const POLL_MS = 200;
const PREVIEWS = 3; // partial images an image job asks for: shown while it denoises
// Example prompts per model; the reference digit models only understand digit captions.
const EXAMPLES = {
  "digits-image": ["a handwritten seven", "the number 3", "digit 0", "a bold eight", "an image of a 5"],
  "digits-video": ["digit 3 moving left", "a seven moving up", "the number 1 moves right", "a handwritten two sliding down"],
  image: ["a lighthouse on a cliff at dusk, oil painting", "a red fox in fresh snow, photo", "a bowl of ramen, studio light"],
  video: ["waves rolling onto a beach at sunset", "a paper boat drifting down a stream", "timelapse of clouds over mountains"],
};
// Server `param` -> the form field that shows its error (the rest go to the general line).
const PARAM_ALIASES = { seconds: "num_frames", n: null, response_format: null, output_format: null };

const $ = (id) => document.getElementById(id);
const state = {
  models: [], model: null, running: null, startupFailure: null, start: null, lastImage: null,
  apiKey: sessionStorage.getItem("lesa-api-key") || "",
};

// ------------------------------------------------------------------------------------- API

class ApiFailure extends Error {
  constructor(status, body, headers) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.param = err.param || null;
    this.code = err.code || null;
    this.retryAfter = headers ? headers.get("Retry-After") : null;
  }
}

async function api(method, path, body, signal) {
  const headers = {};
  if (state.apiKey) headers.Authorization = `Bearer ${state.apiKey}`;
  const form = body instanceof FormData; // the browser sets a form's Content-Type (with its boundary)
  if (body !== undefined && !form) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, signal, body: body === undefined || form ? body : JSON.stringify(body),
  });
  const type = response.headers.get("Content-Type") || "";
  const data = type.includes("json") ? await response.json() : null;
  if (!response.ok) throw new ApiFailure(response.status, data, response.headers);
  return data;
}

// Outputs behind the API key cannot be an <img src>: fetch them with the header, show a blob URL.
async function blobUrl(url) {
  const path = new URL(url, location.href);
  const headers = state.apiKey ? { Authorization: `Bearer ${state.apiKey}` } : {};
  const response = await fetch(path.pathname + path.search, { headers });
  if (!response.ok) {
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON */ }
    throw new ApiFailure(response.status, body, response.headers);
  }
  return URL.createObjectURL(await response.blob());
}

// ---------------------------------------------------------------------------------- errors

function clearErrors() {
  document.querySelectorAll(".error").forEach((el) => { el.textContent = ""; });
  document.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
  showBanner(null);
}

function showBanner(text, kind) {
  const banner = $("banner");
  banner.hidden = !text;
  banner.textContent = text || "";
  banner.dataset.kind = kind || "";
}

function showError(error) {
  if (error.name === "AbortError") return;
  if (!(error instanceof ApiFailure)) {
    $("error-general").textContent = `Cannot reach the server: ${error.message}`;
    return;
  }
  if (error.status === 429) {
    const wait = error.retryAfter ? ` Try again in ${error.retryAfter} s.` : "";
    showBanner(`Server busy (429): ${error.message}.${wait}`, "busy");
    return;
  }
  if (error.status === 503) {
    showBanner(`Server not ready (503): ${error.message}`, "not-ready");
    watchReadiness();
    return;
  }
  if (error.status === 401) {
    $("key-row").hidden = false;
    showBanner(`API key required (401): ${error.message}`, "auth");
    return;
  }
  const param = error.param in PARAM_ALIASES ? PARAM_ALIASES[error.param] : error.param;
  const slot = param && document.querySelector(`.error[data-param="${CSS.escape(param)}"]`);
  if (slot) {
    slot.textContent = error.message;
    const input = document.querySelector(`[name="${CSS.escape(param)}"]`);
    if (input) input.setAttribute("aria-invalid", "true");
  } else {
    $("error-general").textContent = error.message;
  }
}

// ------------------------------------------------------------------------- readiness, models

let readinessTimer = null;

async function checkReady() {
  const pill = $("server-status");
  try {
    const response = await fetch("/readyz");
    const body = await response.json();
    const ready = response.ok;
    const models = (body.checks || {}).models || "";
    state.startupFailure = models.startsWith("failed") ? models.replace(/^failed:\s*/, "") : null;
    pill.dataset.state = ready ? "ready" : "not-ready";
    pill.textContent = ready ? "ready" : `not ready: ${Object.entries(body.checks || {})
      .filter(([, v]) => v !== "ok").map(([k, v]) => `${k} ${v}`).join(", ")}`;
    return ready;
  } catch (error) {
    pill.dataset.state = "not-ready";
    pill.textContent = "server unreachable";
    return false;
  }
}

// While the server is starting (models loading) or failed, poll /readyz and load the models once ready.
function watchReadiness() {
  if (readinessTimer) return;
  readinessTimer = setInterval(async () => {
    const ready = await checkReady();
    if (ready || state.startupFailure) {
      clearInterval(readinessTimer);
      readinessTimer = null;
    }
    if (ready) {
      showBanner(null);
      if (!state.models.length) loadModels();
    } else if (state.startupFailure) {
      showStartupFailure();
    }
  }, 1000);
}

// Loading failed for good (a config typo, weights not cached): waiting would never end.
function showStartupFailure() {
  showBanner(`The server could not load its models: ${state.startupFailure}. Fix the server, then reload this page.`,
    "not-ready");
}

async function loadModels() {
  try {
    const list = await api("GET", "/v1/models");
    state.models = list.data;
  } catch (error) {
    showError(error);
    return;
  }
  const select = $("model");
  select.replaceChildren(...state.models.map((m) => new Option(`${m.id} (${m.kind})`, m.id)));
  if (state.models.length) selectModel(state.models[0].id);
  document.body.dataset.state = "idle";
}

function fmt(value, digits = 2) {
  return typeof value === "number" ? value.toFixed(digits) : "–";
}

function cardPsnr(quality) {
  if (!quality) return null;
  for (const key of ["psnr", "psnr_db", "psnr_vs_full", "psnr_mean"]) {
    if (typeof quality[key] === "number") return quality[key];
  }
  return null;
}

function cardSpeedup(quality) {
  if (!quality) return null;
  for (const key of ["speedup_wall_b1", "speedup_wall_b8", "speedup", "realised_speedup"]) {
    if (typeof quality[key] === "number") return quality[key];
  }
  return null;
}

function levelCard(model, level) {
  const label = document.createElement("label");
  label.className = "level";
  const input = document.createElement("input");
  Object.assign(input, { type: "radio", name: "acceleration", value: level.level });
  const title = document.createElement("b");
  title.textContent = level.level === "none" ? "none (full)" : level.level;
  const detail = document.createElement("span");
  detail.className = "card";
  if (level.level === "none") {
    detail.textContent = `all ${model.default_steps} steps in full`;
  } else {
    const lines = [`${level.full_steps}/${model.default_steps} full steps`];
    const psnr = cardPsnr(level.quality);
    if (level.lesa_available && psnr !== null) {
      const speed = cardSpeedup(level.quality);
      lines.push(`LESA: PSNR ${fmt(psnr, 1)} dB vs full`);
      lines.push(speed !== null ? `${fmt(speed)}× measured` : `${fmt(level.theoretical_speedup)}× in steps`);
      if (level.lesa_steps) lines.push(`trained @ ${level.lesa_steps} steps`);
      detail.classList.add("measured");
    } else {
      lines.push(`${fmt(level.theoretical_speedup)}× in steps`);
      lines.push(level.lesa_available ? "LESA, no quality card" : "TaylorSeer: no card");
    }
    // One line per fact: the cards are narrow.
    detail.replaceChildren(...lines.map((text) => {
      const line = document.createElement("span");
      line.textContent = text;
      return line;
    }));
  }
  detail.title = level.quality ? JSON.stringify(level.quality, null, 1) : "";
  label.append(input, title, detail);
  return label;
}

function autoCard() {
  const label = document.createElement("label");
  label.className = "level";
  const input = document.createElement("input");
  Object.assign(input, { type: "radio", name: "acceleration", value: "auto" });
  const title = document.createElement("b");
  title.textContent = "auto";
  const detail = document.createElement("span");
  detail.className = "card";
  detail.textContent = "fastest LESA level meeting the server's PSNR floor";
  label.append(input, title, detail);
  return label;
}

// The level a visitor most likely wants to see first: the fastest one with a measured LESA
// card, else 5x (TaylorSeer), else whatever the server defaults to.
function preferredLevel(model) {
  const measured = model.acceleration.filter((l) => l.lesa_available && cardPsnr(l.quality) !== null);
  if (measured.length) return measured.sort((a, b) => b.theoretical_speedup - a.theoretical_speedup)[0].level;
  if (model.acceleration.some((l) => l.level === "5x")) return "5x";
  return model.default_acceleration;
}

function examplesFor(model) {
  return model ? EXAMPLES[model.id] || EXAMPLES[model.kind] || [] : [];
}

// The new model's example goes in only where it replaces nothing the user wrote: an empty
// prompt, or the previous model's example left as it was. A typed prompt survives the switch.
function updatePrompt(previous, examples) {
  const prompt = $("prompt").value;
  if (!examples.length || examples.includes(prompt)) return;
  if (prompt.trim() === "" || examplesFor(previous).includes(prompt)) $("prompt").value = examples[0];
}

function selectModel(id) {
  const model = state.models.find((m) => m.id === id);
  const previous = state.model;
  state.model = model;
  $("model").value = id;
  $("model-info").textContent = `${model.kind} model · sizes ${model.sizes.join(", ")} · steps ` +
    `${model.step_range[0]}–${model.step_range[1]} (default ${model.default_steps})` +
    (model.kind === "video" ? ` · ${model.fps} fps` : "");
  $("size").replaceChildren(...model.sizes.map((s) => new Option(s, s)));
  $("frames-field").hidden = model.kind !== "video";
  $("num_frames").replaceChildren(...(model.num_frames || []).map(
    (f) => new Option(`${f} (${(f / (model.fps || 1)).toFixed(1)} s)`, String(f))));
  $("steps").value = model.default_steps;
  $("steps").placeholder = `${model.step_range[0]}–${model.step_range[1]}`;
  $("guidance").value = model.default_guidance_scale;
  const examples = examplesFor(model);
  $("examples").replaceChildren(...examples.map((text) => {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = text;
    button.addEventListener("click", () => { $("prompt").value = text; });
    return button;
  }));
  updatePrompt(previous, examples);
  // Given pixels, where the model takes them: an image edits it, a video starts from it.
  $("start-field").hidden = !model.image_input;
  $("strength-row").hidden = model.kind !== "image";
  $("start-hint").textContent = model.kind === "image"
    ? "redrawn to the prompt (no prompt: a variation of it): strength 0 keeps the image, 1 draws anew"
    : "the clip starts from it (its first frame)";
  const levels = $("levels");
  levels.replaceChildren(...model.acceleration.map((l) => levelCard(model, l)), autoCard());
  const wanted = preferredLevel(model);
  const radio = levels.querySelector(`input[value="${CSS.escape(wanted)}"]`) || levels.querySelector("input");
  radio.checked = true;
  updateButtons();
}

// ------------------------------------------------------------------------------ the request

function intOrNull(id) {
  const raw = $(id).value.trim();
  return raw === "" ? null : Number(raw);
}

function requestBody() {
  const model = state.model;
  const body = {
    model: model.id,
    prompt: $("prompt").value,
    size: $("size").value || null,
    seed: intOrNull("seed"),
    num_inference_steps: intOrNull("steps"),
    guidance_scale: intOrNull("guidance"),
    acceleration: (document.querySelector('input[name="acceleration"]:checked') || {}).value || null,
    method: $("method").value || null,
  };
  if (model.kind === "video") body.num_frames = intOrNull("num_frames");
  // null = "server default": leave the key out rather than send an explicit null.
  return Object.fromEntries(Object.entries(body).filter(([, v]) => v !== null));
}

// The image to start from (a file, or the last result), sent with the request when the model takes one.
function startFrom(blob) {
  state.start = blob;
  const preview = $("start-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.hidden = !blob;
  preview.src = blob ? URL.createObjectURL(blob) : "";
  $("clear-start").hidden = !blob;
  if (!blob) $("start-image").value = "";
  updateButtons();
}

function withStart(body) {
  if (!state.start || !state.model.image_input) return body;
  const form = new FormData();
  for (const [name, value] of Object.entries(body)) form.append(name, String(value));
  if (state.model.kind === "image") {
    form.append("image", state.start, "start.png");
    const strength = $("strength").value.trim();
    if (strength !== "") form.append("strength", strength);
  } else {
    form.append("input_reference", state.start, "first.png");
  }
  return form;
}

function updateButtons() {
  const running = Boolean(state.running);
  const level = (document.querySelector('input[name="acceleration"]:checked') || {}).value;
  $("generate").disabled = running || !state.model;
  // The comparison is made on lossless PNGs, so it is offered for image models only (and plain generations).
  const starting = Boolean(state.start && state.model && state.model.image_input);
  $("compare").disabled = running || !state.model || state.model.kind !== "image" || level === "none" || starting;
  $("compare").title = state.model && state.model.kind !== "image"
    ? "comparison with full compute is available for image models"
    : starting ? "the comparison generates from the prompt alone: clear the image to compare" : "";
  $("use-result").disabled = running || !state.lastImage;
  $("cancel").disabled = !running;
}

function setRunning(job, text) {
  state.running = job;
  $("busy").hidden = !job;
  $("busy").textContent = text || "";
  document.body.dataset.state = job ? "running" : document.body.dataset.state;
  updateButtons();
}

function finish(outcome) {
  state.running = null;
  $("busy").hidden = true;
  document.body.dataset.state = outcome;
  updateButtons();
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function showStats(lesa, clientMs) {
  const rows = [
    ["level", `${lesa.level}${lesa.requested_acceleration ? ` (asked: ${lesa.requested_acceleration})` : ""}`],
    ["method", lesa.method],
    ["steps", `${lesa.num_inference_steps}: ${lesa.full_steps ?? "–"} full, ${lesa.predicted_steps ?? "–"} predicted`],
    ["realised speed-up", lesa.realised_speedup ? `${fmt(lesa.realised_speedup)}× (estimated on this run)` : "–"],
    ["generation", `${fmt(lesa.generation_ms, 0)} ms (queue ${fmt(lesa.queue_ms, 0)} ms, page ${fmt(clientMs, 0)} ms)`],
    ["seed", String(lesa.seed)],
  ];
  $("stats").replaceChildren(...rows.flatMap(([k, v]) => {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = k;
    dd.textContent = v;
    return [dt, dd];
  }));
}

async function pollJob(job, path, onDone, onProgress) {
  const progress = $("progress");
  for (;;) {
    const current = await api("GET", path);
    progress.value = current.progress || 0;
    // While queued the server says how many jobs of the model are ahead: more use than "0%".
    const ahead = current.queue_position;
    // A worker that died mid-run leaves the job to another, which starts over: say why the bar went back.
    const rerun = current.attempts > 1 ? ` (run ${current.attempts}: a worker stopped, started over)` : "";
    $("busy").textContent = current.status === "queued" && ahead != null
      ? `queued, ${ahead === 0 ? "next" : `${ahead} ahead`}${rerun}`
      : `${current.status.replace("_", " ")} ${current.progress || 0}%${rerun}`;
    if (onProgress) await onProgress(current);
    if (current.status === "completed") return onDone(current);
    // The server's own failure, shown as such (a plain Error would read "Cannot reach the server").
    if (current.status === "failed") throw new ApiFailure(500, { error: current.error || { message: "generation failed" } });
    if (current.status === "cancelled") return "cancelled";
    if (state.running !== job) return "cancelled";
    await sleep(POLL_MS);
  }
}

async function generate() {
  clearErrors();
  const model = state.model;
  const body = requestBody();
  const started = performance.now();
  $("result").hidden = false;
  $("output").replaceChildren();
  delete $("output").dataset.previews;
  $("stats").replaceChildren();
  $("progress").hidden = false;
  $("progress").value = 0;
  const job = { kind: model.kind };
  setRunning(job, "submitting…");
  try {
    let outcome;
    if (model.kind === "image") {
      const created = await api("POST", "/v1/images/jobs", withStart({ ...body, partial_images: PREVIEWS }));
      job.id = created.id;
      job.path = `/v1/images/jobs/${created.id}`;
      if (job.cancelRequested) await api("POST", `${job.path}/cancel`); // Cancel was clicked while submitting
      outcome = await pollJob(job, job.path, async (done) => {
        const images = await Promise.all(done.result.data.map(async (d) => {
          const img = new Image();
          img.alt = done.prompt;
          img.src = await blobUrl(d.url);
          return img;
        }));
        $("output").replaceChildren(...images);
        state.lastImage = images[0].src; // "use the result" starts the next request from it
        showStats(done.result.lesa, performance.now() - started);
        return "done";
      }, (current) => showPreview(job, current).catch(() => {})); // previews are a bonus: never fail the job
    } else {
      const created = await api("POST", "/v1/videos", withStart(body));
      job.id = created.id;
      job.path = `/v1/videos/${created.id}`;
      if (job.cancelRequested) await api("POST", `${job.path}/cancel`); // Cancel was clicked while submitting
      outcome = await pollJob(job, job.path, async (done) => {
        await showVideo(done);
        showStats(done.lesa, performance.now() - started);
        return "done";
      });
    }
    $("progress").hidden = outcome === "done";
    if (outcome === "cancelled") {
      $("output").replaceChildren(); // a preview of an image that will never be
      $("error-general").textContent = `Cancelled at ${$("progress").value}%.`;
    }
    finish(outcome);
  } catch (error) {
    $("output").replaceChildren();
    // A refused or failed request has no result to show: an empty panel with a 0% bar would read
    // as still running. The error says what happened.
    $("result").hidden = true;
    showError(error);
    finish("error");
  }
}

// The newest partial image of a running image job: the sampler's estimate of the clean image so
// far, replaced by the result when it comes (`data-previews` counts what the job stored).
async function showPreview(job, current) {
  const have = current.partial_images || 0;
  if (have <= (job.previews || 0)) return;
  job.previews = have;
  $("output").dataset.previews = String(have);
  if (current.status === "completed") return; // the result replaces it at once
  const img = new Image();
  img.className = "preview";
  img.alt = `preview ${have} of ${PREVIEWS}`;
  img.title = "the image as the sampler estimates it so far";
  img.src = await blobUrl(`/v1/images/jobs/${job.id}/partials/${have - 1}`);
  if (state.running === job && !$("output").querySelector("img:not(.preview)")) $("output").replaceChildren(img);
}

// MP4 inline; if this browser cannot decode it (some headless builds lack H.264), the PNG
// thumbnail (middle frame) stands in, with a link to download the MP4.
async function showVideo(done) {
  const thumb = await blobUrl(`/v1/videos/${done.id}/content?variant=thumbnail`);
  const mp4 = await blobUrl(`/v1/videos/${done.id}/content`);
  const video = document.createElement("video");
  Object.assign(video, { src: mp4, poster: thumb, controls: true, autoplay: true, loop: true, muted: true });
  video.playsInline = true;
  const link = document.createElement("a");
  link.href = mp4;
  link.download = `${done.id}.mp4`;
  link.textContent = "download MP4";
  video.addEventListener("error", () => {
    const img = new Image();
    img.src = thumb;
    img.alt = "middle frame (this browser cannot play the MP4)";
    video.replaceWith(img);
  });
  $("output").replaceChildren(video, link);
}

async function compareWithFull() {
  clearErrors();
  const body = requestBody();
  const controller = new AbortController();
  const job = { kind: "compare", controller };
  $("comparison").hidden = false;
  $("cmp-caption").textContent = "running: accelerated, then full compute…";
  for (const id of ["cmp-fast", "cmp-full"]) $(id).removeAttribute("src");
  for (const id of ["cmp-speedup", "cmp-theory", "cmp-psnr", "cmp-fast-time", "cmp-full-time", "cmp-card", "cmp-fast-label"]) {
    $(id).textContent = "";
  }
  setRunning(job, "comparing…");
  try {
    const result = await api("POST", "/v1/playground/compare", body, controller.signal);
    const fast = result.accelerated;
    $("cmp-fast").src = `data:image/png;base64,${fast.image}`;
    $("cmp-full").src = `data:image/png;base64,${result.full.image}`;
    $("cmp-fast-label").textContent = `${fast.lesa.level} · ${fast.lesa.method}`;
    $("cmp-fast-time").textContent = `${fmt(fast.wall_ms, 0)} ms · ${fast.lesa.full_steps}/` +
      `${fast.lesa.num_inference_steps} full steps`;
    $("cmp-full-time").textContent = `${fmt(result.full.wall_ms, 0)} ms · ` +
      `${result.full.lesa.num_inference_steps}/${result.full.lesa.num_inference_steps} full steps`;
    $("cmp-speedup").textContent = `${fmt(result.speedup)}×`;
    // The step-count ratio next to it: on a loaded machine the two wall times can drift apart.
    $("cmp-theory").textContent = `(${fmt(fast.lesa.theoretical_speedup)}× fewer full steps)`;
    $("cmp-psnr").textContent = result.psnr_db >= 100 ? "identical" : `${fmt(result.psnr_db, 1)} dB`;
    $("cmp-caption").textContent = `“${result.prompt}”, seed ${result.seed}`;
    const card = result.quality_card;
    $("cmp-card").textContent = card
      ? `Benchmark card for this level: PSNR ${fmt(cardPsnr(card), 1)} dB, ` +
        `${cardSpeedup(card) !== null ? `${fmt(cardSpeedup(card))}×` : "–"} (${card.measured_by || "benchmark"})`
      : "No benchmark card for this level and step count: these figures are this run's own.";
    finish("done");
  } catch (error) {
    $("cmp-caption").textContent = error.name === "AbortError" ? "cancelled" : "failed";
    if (error.name === "AbortError") $("error-general").textContent = "Comparison cancelled.";
    showError(error);
    finish(error.name === "AbortError" ? "cancelled" : "error");
  }
}

async function cancel() {
  const job = state.running;
  if (!job) return;
  $("cancel").disabled = true;
  if (job.kind === "compare") {
    // Closing the request is the cancel: the server cancels both jobs when the client goes away.
    job.controller.abort();
    return;
  }
  if (!job.path) {
    job.cancelRequested = true; // not created yet: cancelled as soon as the server names it
    return;
  }
  try {
    // POST .../cancel, not DELETE: a click that crosses the job's completion must not delete the
    // result (the next poll shows it as completed).
    await api("POST", `${job.path}/cancel`);
  } catch (error) {
    showError(error);
  }
}

// ----------------------------------------------------------------------------------- wiring

function randomSeed() {
  $("seed").value = Math.floor(Math.random() * 1_000_000);
}

document.addEventListener("DOMContentLoaded", async () => {
  document.body.dataset.state = "loading";
  randomSeed();
  $("model").addEventListener("change", (e) => selectModel(e.target.value));
  $("levels").addEventListener("change", updateButtons);
  $("random-seed").addEventListener("click", randomSeed);
  $("form").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
  $("compare").addEventListener("click", compareWithFull);
  $("cancel").addEventListener("click", cancel);
  $("start-image").addEventListener("change", (event) => startFrom(event.target.files[0] || null));
  $("clear-start").addEventListener("click", () => startFrom(null));
  $("use-result").addEventListener("click", async () => startFrom(await (await fetch(state.lastImage)).blob()));
  $("save-key").addEventListener("click", () => {
    const key = $("api-key").value.trim();
    // Keys travel in an HTTP header: anything else cannot be sent (and would be kept, locking the page).
    if (!/^[\x21-\x7e]+$/.test(key)) {
      showBanner("An API key is printable ASCII without spaces; check what you pasted.", "auth");
      return;
    }
    state.apiKey = key;
    sessionStorage.setItem("lesa-api-key", state.apiKey);
    $("key-row").hidden = true;
    showBanner(null);
    if (!state.models.length) loadModels();
  });
  updateButtons();
  if (await checkReady()) {
    loadModels();
  } else if (state.startupFailure) {
    showStartupFailure();
  } else {
    showBanner("The server is not ready yet (models loading); this page will continue when it is.", "not-ready");
    watchReadiness();
  }
});

// edgediff's web page: a form over the server's AUTOMATIC1111 API (/sdapi/v1). Plain JavaScript,
// no build step, nothing loaded from elsewhere. Everything it shows comes from the API; every
// request carries the key the user gave (kept in sessionStorage: this tab only).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "edgediff-key";
const POLL_MS = 250;
const state = {
  samplers: [], schedulers: [], settings: null, lastSeed: null, busy: false,
  input: null, painting: null, asking: null,
};

// ---- talking to the server -------------------------------------------------------------------

class ServerError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY);
  if (!key) return {};
  const headers = { "X-API-Key": key };
  if (key.includes(":")) {  // user:password for --api-auth (the Guard also takes the key as the password)
    const bytes = new TextEncoder().encode(key);
    headers.Authorization = "Basic " + btoa(String.fromCharCode(...bytes));
  }
  return headers;
}

async function detailOf(response) {
  let detail = "";
  try {
    const body = await response.json();
    detail = body.detail;
    if (Array.isArray(detail)) detail = detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
    else if (typeof detail !== "string") detail = JSON.stringify(body);
  } catch (error) {
    detail = response.statusText;
  }
  const retry = response.headers.get("Retry-After");
  if (response.status === 503 && retry) detail += ` (try again in about ${retry} s)`;
  return detail || `the server answered ${response.status}`;
}

// One request to the API. On 401 it asks for the key and tries again (until the user gives up).
async function api(path, body, { ask = true } = {}) {
  const init = { method: body === undefined ? "GET" : "POST", headers: authHeaders(),
                 credentials: "omit" };  // omit: no browser login box; the key travels in headers
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    throw new ServerError("Cannot reach the server: is edgediff serve still running?", 0);
  }
  if (response.status === 401 && ask) {
    await askKey(sessionStorage.getItem(KEY) ? "The server did not accept that key. Try again." : null);
    return api(path, body, { ask });
  }
  if (!response.ok) throw new ServerError(await detailOf(response), response.status);
  return response.json();
}

// The key dialog; concurrent 401s share one prompt.
function askKey(why) {
  if (state.asking) return state.asking;
  const dialog = $("auth");
  $("auth-why").textContent = why ||
    "Enter the server's API key, or user:password for basic auth. It is kept in this tab only.";
  $("auth-key").value = "";
  state.asking = new Promise((resolve, reject) => {
    dialog.addEventListener("close", () => {
      state.asking = null;
      const key = $("auth-key").value;
      if (dialog.returnValue === "ok" && key) {
        sessionStorage.setItem(KEY, key);
        resolve();
      } else {
        reject(new ServerError("The server wants an API key; nothing was sent without it.", 401));
      }
    }, { once: true });
  });
  dialog.returnValue = "";
  dialog.showModal();
  $("auth-key").focus();
  return state.asking;
}

// ---- messages and status ---------------------------------------------------------------------

function showError(error) {
  const box = $("message");
  box.textContent = error instanceof ServerError ? error.message : `Something went wrong: ${error.message || error}`;
  box.hidden = false;
}

function hideError() {
  $("message").hidden = true;
  $("message").textContent = "";
}

function status(text, fraction) {
  $("progress-text").textContent = text;
  if (fraction !== undefined) $("progress").value = Math.max(0, Math.min(1, fraction));
}

// ---- the form --------------------------------------------------------------------------------

function option(value, text) {
  const element = document.createElement("option");
  element.value = value;
  element.textContent = text;
  return element;
}

function fillSelects() {
  const sampler = $("sampler");
  sampler.replaceChildren();
  for (const item of state.samplers) {
    if (item.options && item.options.scheduler) continue;  // "DPM++ 2M Karras": the schedule picks Karras
    sampler.append(option(item.name, item.name));
  }
  const scheduler = $("scheduler");
  scheduler.replaceChildren(...state.schedulers.map((s) => option(s.name, s.label)));
  // The server's default, as edgediff generate's: DPM++ 2M with the Karras schedule.
  if ([...sampler.options].some((o) => o.value === "DPM++ 2M")) sampler.value = "DPM++ 2M";
  if ([...scheduler.options].some((o) => o.value === "karras")) scheduler.value = "karras";
}

function applySettings(settings) {
  state.settings = settings;
  for (const id of ["width", "height"]) {
    const input = $(id);
    input.min = settings.size_multiple;
    input.step = settings.size_multiple;
    input.max = settings.max_side;
    if (!input.value) input.value = settings.default_size;
  }
  $("steps").max = settings.max_steps;
  $("count").max = settings.max_images;
}

function number(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

function request() {
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative").value,
    sampler_name: $("sampler").value, scheduler: $("scheduler").value,
    steps: number("steps"), cfg_scale: number("cfg"), width: number("width"), height: number("height"),
    seed: number("seed") ?? -1, batch_size: number("count") ?? 1, n_iter: 1, send_images: true,
  };
  if (state.input) {
    body.init_images = [state.input];
    body.denoising_strength = Number($("strength").value);
    if (maskPainted()) {
      body.mask = maskImage();
      body.mask_blur = number("blur") ?? 0;
      body.inpainting_mask_invert = $("invert").checked ? 1 : 0;
    }
  }
  for (const [name, value] of Object.entries(body)) if (value === undefined) delete body[name];
  return body;
}

function matchSampler(name) {
  const wanted = String(name || "").toLowerCase();
  const found = state.samplers.find((s) => s.name.toLowerCase() === wanted ||
                                           (s.aliases || []).some((a) => a.toLowerCase() === wanted));
  if (!found) return null;
  if (found.options && found.options.scheduler) {  // an older A1111 name: base sampler + its schedule
    const base = state.samplers.find((s) => !(s.options && s.options.scheduler) &&
                                            found.name.startsWith(s.name + " "));
    return { sampler: base ? base.name : found.name, scheduler: found.options.scheduler };
  }
  return { sampler: found.name, scheduler: null };
}

// Fill the form from A1111's parsed infotext (/sdapi/v1/png-info's `parameters`).
function fillForm(p) {
  const set = (id, key) => { if (p[key] !== undefined && p[key] !== "") $(id).value = p[key]; };
  $("prompt").value = p.Prompt ?? "";
  $("negative").value = p["Negative prompt"] ?? "";
  set("steps", "Steps"); set("cfg", "CFG scale"); set("seed", "Seed");
  set("width", "Size-1"); set("height", "Size-2");
  if (state.input) set("strength", "Denoising strength");
  const match = matchSampler(p.Sampler);
  if (match) $("sampler").value = match.sampler;
  const label = String(p["Schedule type"] || "").toLowerCase();
  const schedule = state.schedulers.find((s) => s.label.toLowerCase() === label || s.name === label);
  $("scheduler").value = schedule ? schedule.name : (match && match.scheduler) || "automatic";
  $("count").value = 1;
  syncLoras();
  updateOutputs();
}

function updateOutputs() {
  $("strength-value").value = $("strength").value;
  $("brush-value").value = $("brush").value;
}

// ---- LoRAs: checking one writes its <lora:name:weight> tag into the prompt, as A1111 does ------

function escapeRegExp(text) { return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"); }
function loraTag(name) { return new RegExp(`\\s*<lora:${escapeRegExp(name)}(?::([^:>]*))?(?::[^>]*)?>`, "g"); }

function fillLoras(loras) {
  const list = $("loras");
  list.replaceChildren();
  $("lora-none").hidden = state.settings && state.settings.lora_dir && loras.length > 0;
  if (state.settings && state.settings.lora_dir && !loras.length) {
    $("lora-none").textContent = "The server's LoRA folder has no .safetensors files.";
  }
  loras.forEach((lora, i) => {
    const item = document.createElement("li");
    item.innerHTML = `<label class="check" for="lora-${i}"><input type="checkbox" id="lora-${i}"> <span></span></label>
      <label for="lora-weight-${i}">weight <input type="number" id="lora-weight-${i}" step="0.05" value="1"></label>`;
    item.querySelector("span").textContent = lora.name;
    const box = item.querySelector("input[type=checkbox]");
    const weight = item.querySelector("input[type=number]");
    box.dataset.lora = lora.name;
    weight.dataset.lora = lora.name;
    box.addEventListener("change", () => writeLora(lora.name, box.checked, weight.value));
    weight.addEventListener("input", () => { if (box.checked) writeLora(lora.name, true, weight.value); });
    list.append(item);
  });
}

function writeLora(name, on, weight) {
  const prompt = $("prompt");
  let text = prompt.value.replace(loraTag(name), "");
  if (on) text = `${text.trimEnd()}${text.trim() ? " " : ""}<lora:${name}:${Number(weight) || 0}>`;
  prompt.value = text;
}

function syncLoras() {  // the prompt is the truth: boxes follow the tags typed or loaded into it
  for (const box of $("loras").querySelectorAll("input[type=checkbox]")) {
    const match = [...$("prompt").value.matchAll(loraTag(box.dataset.lora))][0];
    box.checked = Boolean(match);
    if (match && match[1] !== undefined) box.closest("li").querySelector("input[type=number]").value = match[1];
  }
}

// ---- the input picture and its mask ----------------------------------------------------------

function readAsDataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new ServerError("Could not read that file.", 0));
    reader.readAsDataURL(blob);
  });
}

async function setInput(source) {
  const url = typeof source === "string" ? source : await readAsDataURL(source);
  const image = $("input-image");
  image.src = url;
  try {
    await image.decode();
  } catch (error) {
    throw new ServerError("That file is not a picture this browser can read (PNG, JPEG or WebP).", 0);
  }
  state.input = url;
  const canvas = $("mask");
  canvas.width = image.naturalWidth;
  canvas.height = image.naturalHeight;
  $("paint").hidden = false;
  $("input-tools").hidden = false;
  const multiple = state.settings ? state.settings.size_multiple : 8;
  const side = (n) => Math.max(multiple, Math.min(state.settings ? state.settings.max_side : n,
                                                   Math.round(n / multiple) * multiple));
  $("width").value = side(image.naturalWidth);
  $("height").value = side(image.naturalHeight);
  status("Picture loaded: the next image starts from it (paint over it to inpaint).");
}

function clearInput() {
  state.input = null;
  $("input-image").removeAttribute("src");
  $("paint").hidden = true;
  $("input-tools").hidden = true;
}

function clearMask() {
  const canvas = $("mask");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
}

function maskPainted() {
  const canvas = $("mask");
  if (!canvas.width) return false;
  const alpha = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  for (let i = 3; i < alpha.length; i += 4) if (alpha[i] >= 128) return true;
  return false;
}

// The mask the server wants: white repaints, black keeps, the picture's size.
function maskImage() {
  const canvas = $("mask");
  const painted = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  const out = document.createElement("canvas");
  out.width = canvas.width;
  out.height = canvas.height;
  const context = out.getContext("2d");
  const mask = context.createImageData(canvas.width, canvas.height);
  for (let i = 0; i < painted.data.length; i += 4) {
    const value = painted.data[i + 3] >= 128 ? 255 : 0;  // the brush's soft edge, made binary
    mask.data[i] = mask.data[i + 1] = mask.data[i + 2] = value;
    mask.data[i + 3] = 255;
  }
  context.putImageData(mask, 0, 0);
  return out.toDataURL("image/png");
}

function canvasPoint(event) {
  const canvas = $("mask");
  const box = canvas.getBoundingClientRect();
  return [(event.clientX - box.left) * canvas.width / box.width,
          (event.clientY - box.top) * canvas.height / box.height];
}

function paint(event) {
  const context = $("mask").getContext("2d");
  const [x, y] = canvasPoint(event);
  const [x0, y0] = state.painting || [x, y];
  context.globalCompositeOperation = $("erase").checked ? "destination-out" : "source-over";
  context.strokeStyle = context.fillStyle = "#ff2d55";
  context.lineWidth = Number($("brush").value);
  context.lineCap = context.lineJoin = "round";
  context.beginPath();
  context.moveTo(x0, y0);
  context.lineTo(x, y);
  context.stroke();
  state.painting = [x, y];
}

// ---- generating ------------------------------------------------------------------------------

function setBusy(busy) {
  state.busy = busy;
  $("generate").disabled = busy;
  $("stop").disabled = !busy;
  $("form").setAttribute("aria-busy", String(busy));
}

function startPolling(count) {
  let stopped = false;
  let timer = null;
  async function tick() {
    try {
      const p = await api("/sdapi/v1/progress", undefined, { ask: false });
      if (stopped) return;
      const s = p.state;
      if (s.sampling_steps > 0) {
        const left = p.eta_relative > 0 ? ` · about ${p.eta_relative.toFixed(1)} s left` : "";
        const image = count > 1 ? `image ${s.job_no + 1}/${count} · ` : "";
        status(`${image}step ${s.sampling_step}/${s.sampling_steps}${left}`, p.progress);
      } else if (s.job_count > 0) {
        status("Waiting in the queue…");
      }
      if (p.current_image) {
        $("preview").src = `data:image/png;base64,${p.current_image}`;
        $("preview").hidden = false;
      }
    } catch (error) {
      // a missed poll only delays the next update; the generation request reports real errors
    }
    if (!stopped) timer = setTimeout(tick, POLL_MS);
  }
  timer = setTimeout(tick, POLL_MS / 2);
  return () => { stopped = true; clearTimeout(timer); };
}

async function generate() {
  if (state.busy) return;
  hideError();
  if (document.body.dataset.ready !== "true" && !(await load())) return;
  const body = request();
  const path = state.input ? "/sdapi/v1/img2img" : "/sdapi/v1/txt2img";
  const started = performance.now();
  setBusy(true);
  status("Starting…", 0);
  const stopPolling = startPolling(body.batch_size || 1);
  try {
    const result = await api(path, body);
    const info = JSON.parse(result.info);
    addResults(result.images, info);
    state.lastSeed = info.seed;
    $("seed-reuse").disabled = false;
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const what = `${result.images.length} image${result.images.length === 1 ? "" : "s"}`;
    status(info.interrupted ? `Stopped: ${what} as far as they got (${seconds} s).` : `Done: ${what} in ${seconds} s.`, 1);
  } catch (error) {
    showError(error);
    status("Nothing generated.", 0);
  } finally {
    stopPolling();
    setBusy(false);
    $("preview").hidden = true;
  }
}

async function stop() {
  try {
    await api("/sdapi/v1/interrupt", {});
    status("Stopping after this step…");
  } catch (error) {
    showError(error);
  }
}

// ---- the gallery -----------------------------------------------------------------------------

function button(text, action) {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = text;
  element.addEventListener("click", () => action().catch(showError));
  return element;
}

function addResults(images, info) {
  const group = document.createDocumentFragment();
  images.forEach((b64, i) => {
    const url = `data:image/png;base64,${b64}`;
    const seed = (info.all_seeds || [])[i] ?? info.seed;
    const text = (info.infotexts || [])[i] || "";
    const figure = document.createElement("figure");
    const image = document.createElement("img");
    image.src = url;
    image.alt = `seed ${seed}: ${info.prompt || "(no prompt)"}`;
    const caption = document.createElement("figcaption");
    const infotext = document.createElement("pre");
    infotext.className = "infotext";
    infotext.textContent = text;
    const download = document.createElement("a");
    download.href = url;
    download.download = `edgediff-${seed}.png`;
    download.textContent = "Download";
    download.className = "button";
    const actions = document.createElement("div");
    actions.className = "row";
    actions.append(download,
      button("Use as input", async () => { await setInput(url); $("prompt").focus(); }),
      button("Send parameters to the form", async () => {
        const found = await api("/sdapi/v1/png-info", { image: url });
        fillForm(found.parameters);
        status(`Settings of seed ${seed} are in the form.`);
      }));
    caption.append(infotext, actions);
    figure.append(image, caption);
    group.append(figure);
  });
  $("gallery").prepend(group);
}

// Settings from a PNG's A1111 `parameters` text (the server reads it: /sdapi/v1/png-info).
async function loadParameters(file) {
  const found = await api("/sdapi/v1/png-info", { image: await readAsDataURL(file) });
  if (!found.info) {
    throw new ServerError(`${file.name || "That picture"} carries no generation settings. ` +
                          "Drop it on \"Input picture\" to start from it instead.", 0);
  }
  fillForm(found.parameters);
  status(`Settings loaded from ${file.name || "the picture"}.`);
}

// ---- wiring ----------------------------------------------------------------------------------

function imageFile(list) {
  return [...(list || [])].find((f) => f && f.type && f.type.startsWith("image/")) || null;
}

function wire() {
  $("form").addEventListener("submit", (event) => { event.preventDefault(); generate(); });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !$("auth").open) {
      event.preventDefault();
      generate();
    }
  });
  $("stop").addEventListener("click", stop);
  $("seed-random").addEventListener("click", () => { $("seed").value = -1; });
  $("seed-reuse").addEventListener("click", () => { if (state.lastSeed !== null) $("seed").value = state.lastSeed; });
  $("prompt").addEventListener("input", syncLoras);
  $("strength").addEventListener("input", updateOutputs);
  $("brush").addEventListener("input", updateOutputs);
  $("choose").addEventListener("click", () => $("file").click());
  $("file").addEventListener("change", () => {
    const file = imageFile($("file").files);
    if (file) setInput(file).catch(showError);
    $("file").value = "";
  });
  $("input-clear").addEventListener("click", clearInput);
  $("mask-clear").addEventListener("click", clearMask);
  $("auth").addEventListener("cancel", () => { $("auth").returnValue = ""; });

  const canvas = $("mask");
  canvas.addEventListener("pointerdown", (event) => {
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    state.painting = null;
    paint(event);
  });
  canvas.addEventListener("pointermove", (event) => { if (state.painting) paint(event); });
  for (const end of ["pointerup", "pointercancel"]) canvas.addEventListener(end, () => { state.painting = null; });

  document.addEventListener("dragover", (event) => {
    if ([...event.dataTransfer.types].includes("Files")) {
      event.preventDefault();
      event.dataTransfer.dropEffect = "copy";
    }
  });
  document.addEventListener("drop", (event) => {
    const file = imageFile(event.dataTransfer.files);
    if (!file) return;
    event.preventDefault();
    hideError();
    const work = $("input-set").contains(event.target) ? setInput(file) : loadParameters(file);
    work.catch(showError);
  });
  document.addEventListener("paste", (event) => {
    const file = imageFile([...event.clipboardData.items].filter((i) => i.kind === "file").map((i) => i.getAsFile()));
    if (!file) return;  // text pastes as usual
    event.preventDefault();
    setInput(file).catch(showError);
  });
}

// Fill the form from the server; again on Generate if the first try failed (e.g. no key given).
async function load() {
  try {
    const [samplers, schedulers, settings, models] = await Promise.all([
      api("/sdapi/v1/samplers"), api("/sdapi/v1/schedulers"), api("/edgediff/v1/page"), api("/sdapi/v1/sd-models"),
    ]);
    state.samplers = samplers;
    state.schedulers = schedulers;
    fillSelects();
    applySettings(settings);
    $("model").textContent = models.length ? `model: ${models[0].title}` : "";
    fillLoras(await api("/sdapi/v1/loras"));
    document.body.dataset.ready = "true";  // for scripts and tests: the form is filled in
    return true;
  } catch (error) {
    showError(error);
    return false;
  }
}

wire();
updateOutputs();
load();

// The playground: read /info, post the Azure ML scoring contract to /score, show what comes back;
// or post it as a job (Prefer: respond-async) and follow it in the Jobs panel through /v1/jobs.
// Plain browser JavaScript, no build step and nothing fetched from outside the server.
"use strict";

(() => {
  const KEY_STORAGE = "sd-endpoint-api-key";
  const SEED_PLACEHOLDER = "__seed__";
  const $ = (id) => document.getElementById(id);
  const DEFAULT_STRENGTH = 0.8; // the server's default: without a mask, and with one
  const MASK_STRENGTH = 1;
  const MASK_COLOUR = "#ff2d6f"; // what the user sees; the mask sent is where the strokes are
  const JOB_PROMPTS = "sd-endpoint-job-prompts"; // job id -> prompt, for this tab (the list has no bodies)
  const JOBS_LISTED = 10;
  const POLL_MS = 1000;
  const RETRY_MS = 3000; // after a poll that could not reach the server
  const FINISHED = ["succeeded", "failed", "cancelled"];
  const state = {
    busy: false,
    retryGenerate: false,
    image: null, // base64 of the chosen file, as it is
    imageReady: Promise.resolve(), // settles once the chosen file has been read
    masked: false, // a stroke has been painted since the mask was last cleared
    strengthSet: false, // the user moved the strength slider for this image
    stroke: null, // the last point of the stroke being painted, in the image's pixels
    jobs: new Map(), // id -> { view, timer, show (open its images once it succeeds), row }
  };

  class ApiError extends Error {
    constructor(message, status, requestId) {
      super(message);
      this.status = status;
      this.requestId = requestId;
    }
  }

  // crypto.randomUUID only exists on https or localhost; getRandomValues works everywhere.
  function newRequestId() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // Seeds go up to 2**63 - 1, beyond the integers a JS number holds exactly: keep them as strings.
  function parseWithStringSeeds(text) {
    return JSON.parse(text.replace(/"seed"\s*:\s*(\d+)/g, '"seed":"$1"'));
  }

  function slug(text) {
    const s = text.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 40);
    return s.replace(/-+$/, "") || "image";
  }

  function serverMessage(response, text) {
    try {
      const body = JSON.parse(text);
      if (body && body.error && typeof body.error.message === "string" && body.error.message) {
        return body.error.message;
      }
    } catch (_) {
      // Not JSON (a proxy's HTML page, say): fall through to the status line.
    }
    const status = `${response.status} ${response.statusText}`.trim();
    return `The server answered HTTP ${status} without an error message; see its logs.`;
  }

  // One place for every call: request id, key, and turning any failure into a readable message.
  // Paths are relative ("score", not "/score"): they resolve next to /ui, under any proxy prefix.
  async function call(path, options = {}) {
    const requestId = newRequestId();
    const headers = { Accept: "application/json", "x-request-id": requestId, ...(options.headers || {}) };
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) headers.Authorization = `Bearer ${key}`;
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (_) {
      throw new ApiError(
        "Cannot reach the server: it may be down or restarting. Check that it runs, then try again.",
        0,
        requestId,
      );
    }
    const text = await response.text();
    const answeredId = response.headers.get("x-request-id") || requestId;
    if (!response.ok) throw new ApiError(serverMessage(response, text), response.status, answeredId);
    return { text, requestId: answeredId, status: response.status };
  }

  function describe(error) {
    if (error instanceof ApiError) return error.message;
    return `Unexpected problem in the page: ${error && error.message ? error.message : String(error)}`;
  }

  // ---- model information ----

  function showInfo(info) {
    const where = [info.architecture, info.device, info.dtype].filter(Boolean).join(", ");
    $("model").textContent = `Model: ${info.name}${where ? ` (${where})` : ""}`;
    $("random-warning").hidden = !info.random_weights;

    const select = $("scheduler");
    const schedulers = Array.isArray(info.schedulers) ? info.schedulers : [];
    if (schedulers.length) {
      // Preselect the model's default by name; a server may instead offer it as "default" and name
      // the class in default_scheduler, which then labels that option.
      const named = schedulers.includes(info.default_scheduler);
      const selected = named ? info.default_scheduler : schedulers.includes("default") ? "default" : schedulers[0];
      select.replaceChildren(
        ...schedulers.map((name) => {
          const option = document.createElement("option");
          option.value = name;
          option.textContent = !named && name === "default" && info.default_scheduler
            ? `default (${info.default_scheduler.replace(/Scheduler$/, "")})`
            : name;
          option.selected = name === selected;
          return option;
        }),
      );
    }
    // The models the server serves by name (SD_MODELS), the default first; one model: no choice.
    const models = Array.isArray(info.models)
      ? info.models.filter((entry) => entry && typeof entry.name === "string")
      : [];
    const picked = $("model-choice").value;
    $("model-choice").replaceChildren(
      ...models.map((entry) => {
        const kind = entry.inpainting ? ", inpainting" : "";
        const option = new Option(`${entry.name} (${entry.architecture || "?"}${kind})`, entry.default ? "" : entry.name);
        option.selected = entry.default ? picked === "" : picked === entry.name;
        return option;
      }),
    );
    $("model-field").hidden = models.length < 2;
    // LoRA adapters the server serves (names from its SD_ADAPTERS folder), "none" first.
    const adapters = Array.isArray(info.adapters) ? info.adapters.filter((name) => typeof name === "string") : [];
    const chosen = $("adapter").value;
    $("adapter").replaceChildren(new Option("none", ""), ...adapters.map((name) => new Option(name, name)));
    $("adapter").value = adapters.includes(chosen) ? chosen : "";
    $("adapter-field").hidden = $("adapter-scale-field").hidden = adapters.length === 0;
    // Start at the model's native size, unless the user already changed the fields.
    for (const [id, value] of [["width", info.native_width], ["height", info.native_height]]) {
      const input = $(id);
      if (value && input.value === input.defaultValue) input.value = input.defaultValue = String(value);
    }
    const limits = info.limits || {};
    if (limits.max_steps) $("steps").max = limits.max_steps;
    if (limits.max_images_per_prompt) $("num-images").max = limits.max_images_per_prompt;
    for (const id of ["width", "height"]) {
      if (limits.min_size) $(id).min = limits.min_size;
      if (limits.max_size) $(id).max = limits.max_size;
    }
  }

  async function loadInfo() {
    try {
      const { text } = await call("info");
      showInfo(JSON.parse(text));
    } catch (error) {
      if (error.status === 401) {
        $("model").textContent = "Model information needs an API key.";
        askForKey(error.message, false);
      } else {
        $("model").textContent = `Model information unavailable: ${describe(error)}`;
      }
    }
  }

  // ---- API key ----

  function askForKey(message, retryGenerate) {
    const hadKey = sessionStorage.getItem(KEY_STORAGE) !== null;
    sessionStorage.removeItem(KEY_STORAGE);
    state.retryGenerate = state.retryGenerate || retryGenerate;
    // Two calls can fail at once with the same key: keep the first, more telling, message.
    if (hadKey) $("key-message").textContent = `The server refused that key: ${message}`;
    else if ($("key-form").hidden) $("key-message").textContent = message;
    $("key-form").hidden = false;
    $("key").focus();
  }

  function useKey(event) {
    event.preventDefault();
    const key = $("key").value.trim();
    if (!key) {
      $("key-message").textContent = "Enter the API key the server was started with (SD_API_KEYS).";
      return;
    }
    // A header value must be plain ASCII; anything else would fail inside fetch as a "network" error.
    if (!/^[\x21-\x7e]+$/.test(key)) {
      $("key-message").textContent = "That is not an API key: keys are letters, digits and symbols, no spaces.";
      return;
    }
    sessionStorage.setItem(KEY_STORAGE, key);
    $("key").value = "";
    $("key-form").hidden = true;
    const retry = state.retryGenerate;
    state.retryGenerate = false;
    loadInfo();
    loadJobs();
    if (retry) generate();
  }

  // ---- an image to start from, and the mask painted over it ----

  function readFile(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(String(reader.result));
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  // A data: URL's payload: base64 of the file's own bytes, with no prefix.
  function base64Of(dataUrl) {
    const comma = dataUrl.indexOf(",");
    return comma < 0 ? "" : dataUrl.slice(comma + 1);
  }

  function setStrength(value) {
    $("strength").value = String(value);
    showStrength();
  }

  function showStrength() {
    $("strength-value").textContent = Number($("strength").value).toFixed(2);
  }

  function showBrush() {
    $("brush-size-value").textContent = `${$("brush-size").value} px`;
  }

  function resetImage() {
    state.image = null;
    state.imageReady = Promise.resolve();
    state.strengthSet = false;
    clearMask();
    setStrength(DEFAULT_STRENGTH);
    const canvas = $("mask-canvas");
    canvas.width = canvas.height = 0;
    $("image-preview").removeAttribute("src");
    $("image-editor").hidden = true;
  }

  function clearImage() {
    $("image-file").value = "";
    resetImage();
    $("image-file").focus();
  }

  function chooseImage() {
    resetImage();
    const file = $("image-file").files[0];
    if (!file) return;
    state.imageReady = readFile(file).then(
      (dataUrl) => {
        if ($("image-file").files[0] !== file) return; // another file was chosen meanwhile
        state.image = base64Of(dataUrl);
        $("image-unreadable").hidden = true;
        $("image-preview").hidden = false;
        $("image-editor").hidden = false;
        $("image-preview").src = dataUrl;
      },
      (error) => showError(`Cannot read ${file.name}: ${error && error.message ? error.message : error}`),
    );
  }

  // The mask canvas takes the image's own pixel size (the displayed size is only CSS), and Width
  // and Height the size the server would draw the image at by itself: aspect kept, within the
  // limits, in multiples of 8 (service/images_in/sizes.py), where the user can still change them.
  function imageShown() {
    const preview = $("image-preview");
    if (!state.image || !preview.naturalWidth) return;
    const canvas = $("mask-canvas");
    canvas.width = preview.naturalWidth;
    canvas.height = preview.naturalHeight;
    canvas.hidden = false;
    const [width, height] = drawnSize(preview.naturalWidth, preview.naturalHeight);
    $("width").value = String(width);
    $("height").value = String(height);
  }

  function drawnSize(width, height) {
    const low = Math.ceil((Number($("width").min) || 128) / 8) * 8;
    const high = Math.floor((Number($("width").max) || 1024) / 8) * 8;
    let sides = [width, height];
    const longest = Math.max(...sides);
    if (longest > high) sides = sides.map((side) => Math.floor((side * high) / longest));
    const shortest = Math.min(...sides);
    if (shortest < low) sides = sides.map((side) => Math.floor((side * low) / shortest));
    return sides.map((side) => Math.min(high, Math.max(low, Math.floor(side / 8) * 8)));
  }

  // Not an image this browser can show: nothing to paint on; the server gives the verdict.
  function imageUnreadable() {
    if (!state.image) return;
    $("image-preview").hidden = $("mask-canvas").hidden = true;
    $("image-unreadable").hidden = false;
  }

  function canvasPoint(event) {
    const canvas = $("mask-canvas");
    const box = canvas.getBoundingClientRect();
    return [
      ((event.clientX - box.left) * canvas.width) / box.width,
      ((event.clientY - box.top) * canvas.height) / box.height,
    ];
  }

  // Strokes in image pixels; the brush size is in screen pixels, as the user sees it.
  function paint(event) {
    const canvas = $("mask-canvas");
    const context = canvas.getContext("2d");
    const [x, y] = canvasPoint(event);
    const box = canvas.getBoundingClientRect();
    context.lineWidth = (Number($("brush-size").value) * canvas.width) / box.width;
    context.lineCap = context.lineJoin = "round";
    context.strokeStyle = context.fillStyle = MASK_COLOUR;
    context.beginPath();
    if (event.type === "pointerdown") {
      context.arc(x, y, context.lineWidth / 2, 0, 2 * Math.PI);
      context.fill();
    } else {
      context.moveTo(...state.stroke);
      context.lineTo(x, y);
      context.stroke();
    }
    state.stroke = [x, y];
    if (!state.masked) {
      state.masked = true;
      if (!state.strengthSet) setStrength(MASK_STRENGTH);
    }
  }

  function startStroke(event) {
    if (event.button !== 0 || !state.image) return;
    event.preventDefault();
    $("mask-canvas").setPointerCapture(event.pointerId);
    paint(event);
  }

  function continueStroke(event) {
    if (!state.stroke) return;
    event.preventDefault();
    paint(event);
  }

  function endStroke() {
    state.stroke = null;
  }

  function clearMask() {
    const canvas = $("mask-canvas");
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    state.masked = false;
    state.stroke = null;
    if (!state.strengthSet) setStrength(DEFAULT_STRENGTH);
  }

  // The mask as the server takes it: a PNG of the image's own size, white where painted (repaint),
  // black elsewhere (keep), nothing in between; null when nothing is painted.
  function maskPng() {
    const canvas = $("mask-canvas");
    if (!state.masked || canvas.hidden || !canvas.width) return null;
    const strokes = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    const mask = document.createElement("canvas");
    mask.width = canvas.width;
    mask.height = canvas.height;
    const context = mask.getContext("2d");
    const pixels = context.createImageData(mask.width, mask.height);
    let painted = false;
    for (let i = 0; i < strokes.length; i += 4) {
      const level = strokes[i + 3] >= 128 ? 255 : 0;
      painted = painted || level === 255;
      pixels.data[i] = pixels.data[i + 1] = pixels.data[i + 2] = level;
      pixels.data[i + 3] = 255;
    }
    if (!painted) return null;
    context.putImageData(pixels, 0, 0);
    return base64Of(mask.toDataURL("image/png"));
  }

  // The image columns of the request: none without an image; "mask_image" only when painted.
  function pictureColumns() {
    if (!state.image) return {};
    const mask = maskPng();
    return mask ? { image: state.image, mask_image: mask } : { image: state.image };
  }

  // ---- generation ----

  function setBusy(busy) {
    state.busy = busy;
    $("generate").disabled = busy;
    $("generate").textContent = busy ? "Generating…" : "Generate";
    $("spinner").hidden = !busy;
    $("generate-form").setAttribute("aria-busy", String(busy));
  }

  function showError(message, detail = "") {
    $("error-message").textContent = message;
    $("error-detail").textContent = detail;
    $("error").hidden = false;
  }

  // Blank fields are left out so that the server's defaults apply; anything typed is sent as typed.
  function readParameters() {
    const parameters = {};
    const fields = [
      ["steps", "num_inference_steps", "Steps"],
      ["guidance", "guidance_scale", "Guidance"],
      ["width", "width", "Width"],
      ["height", "height", "Height"],
      ["num-images", "num_images_per_prompt", "Images per prompt"],
    ];
    for (const [id, name, label] of fields) {
      const input = $(id);
      if (input.validity.badInput) throw new ApiError(`${label} must be a number.`, 0, "");
      if (input.value !== "") parameters[name] = Number(input.value);
    }
    if ($("scheduler").value) parameters.scheduler = $("scheduler").value;
    if ($("model-choice").value) parameters.model = $("model-choice").value;
    if ($("adapter").value) {
      // One adapter at its scale (blank: 1); the server says when the scale is out of its range.
      const scale = $("adapter-scale");
      if (scale.validity.badInput) throw new ApiError("Adapter scale must be a number.", 0, "");
      parameters.adapters = { [$("adapter").value]: scale.value === "" ? 1 : Number(scale.value) };
    }
    if (state.image) parameters.strength = Number($("strength").value);
    return parameters;
  }

  function requestBody(prompt, negativePrompt, parameters, seedText, pictures = {}) {
    if (seedText) parameters.seed = SEED_PLACEHOLDER;
    const columns = ["prompt", "negative_prompt", ...Object.keys(pictures)];
    const row = [prompt, negativePrompt, ...Object.values(pictures)];
    const body = JSON.stringify({ input_data: { columns, data: [row], parameters } });
    // The seed goes in as written, digit for digit, never through a lossy JS number.
    return seedText ? body.replace(`"${SEED_PLACEHOLDER}"`, seedText) : body;
  }

  function imageCard(item, fallbackPrompt) {
    const seed = item.seed === undefined || item.seed === null ? "" : String(item.seed);
    const src = `data:image/png;base64,${item.generated_image}`;
    const figure = document.createElement("figure");
    figure.className = "result";

    const img = document.createElement("img");
    img.src = src;
    img.alt = `Generated image${seed ? ` for seed ${seed}` : ""}: ${item.prompt || fallbackPrompt}`;
    figure.append(img);

    const caption = document.createElement("figcaption");
    if (seed) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "seed";
      button.title = "Use this seed for the next image";
      button.dataset.seed = seed;
      button.append("seed ");
      const value = document.createElement("span");
      value.className = "seed-value";
      value.textContent = seed;
      button.append(value);
      caption.append(button);
    }
    if (item.nsfw_content_detected === true) {
      const badge = document.createElement("span");
      badge.className = "badge nsfw";
      badge.title = "The safety checker flagged this image and blacked it out.";
      badge.textContent = "NSFW";
      caption.append(badge);
    }
    const link = document.createElement("a");
    link.className = "download";
    link.href = src;
    link.download = `${slug(item.prompt || fallbackPrompt)}${seed ? `-${seed}` : ""}.png`;
    link.textContent = "Download";
    caption.append(link);

    figure.append(caption);
    return figure;
  }

  // idLabel: what the id is, "request id" for a direct generation, "job" for a job's images.
  function showResults(items, prompt, elapsedMs, requestId, idLabel = "request id") {
    const count = `${items.length} image${items.length === 1 ? "" : "s"}`;
    $("latency").textContent = `${count} in ${(elapsedMs / 1000).toFixed(2)} s`;
    $("id-label").textContent = idLabel;
    $("request-id").textContent = requestId;
    $("meta").hidden = false;
    $("images").replaceChildren(...items.map((item) => imageCard(item, prompt)));
  }

  async function generate() {
    if (state.busy) return;
    $("error").hidden = true;
    // 1. Read and check the form: only what the server cannot tell the user better.
    const prompt = $("prompt").value.trim();
    const seedText = $("seed").value.trim();
    if (!prompt) {
      showError("Write a prompt first.");
      $("prompt").focus();
      return;
    }
    if (seedText && !/^\d+$/.test(seedText)) {
      showError("The seed must be a whole number (0 or more), or blank for a random seed.");
      $("seed").focus();
      return;
    }
    await state.imageReady; // a file chosen a moment ago is still being read
    let body;
    try {
      const parameters = readParameters();
      body = requestBody(prompt, $("negative-prompt").value.trim(), parameters, seedText, pictureColumns());
    } catch (error) {
      showError(describe(error));
      return;
    }
    // 2. Post, timing the whole round trip as the user sees it; as a job, the server answers 202
    //    with the job at once, and the Jobs panel follows it from there.
    const asJob = $("as-job").checked;
    const headers = { "Content-Type": "application/json" };
    if (asJob) headers.Prefer = "respond-async";
    setBusy(true);
    const started = performance.now();
    try {
      const { text, requestId, status } = await call("score", { method: "POST", headers, body });
      const elapsed = performance.now() - started;
      if (asJob && status === 202) {
        const job = parseWithStringSeeds(text);
        rememberPrompt(job.id, prompt);
        followJob(job, true);
        return;
      }
      // 3. Show the images, each with its seed, badge and download link.
      const items = parseWithStringSeeds(text);
      if (!Array.isArray(items)) {
        throw new ApiError("The server answered something other than a list of images.", 200, requestId);
      }
      showResults(items, prompt, elapsed, requestId);
    } catch (error) {
      if (error.status === 401) {
        askForKey(error.message, true);
      } else {
        const id = error.requestId ? `request id ${error.requestId}` : "";
        showError(describe(error), id);
      }
    } finally {
      setBusy(false);
    }
  }

  // ---- jobs: requests that outlive the page (GET/POST/DELETE /v1/jobs...) ----

  function jobPath(id, action = "") {
    return `v1/jobs/${encodeURIComponent(id)}${action}`;
  }

  function prompts() {
    try {
      const kept = JSON.parse(sessionStorage.getItem(JOB_PROMPTS) || "{}");
      return kept && typeof kept === "object" ? kept : {};
    } catch (_) {
      return {};
    }
  }

  // The newest 50 are kept: enough for any list the panel shows.
  function rememberPrompt(id, prompt) {
    const kept = prompts();
    delete kept[id];
    kept[id] = prompt;
    const ids = Object.keys(kept);
    for (const old of ids.slice(0, Math.max(0, ids.length - 50))) delete kept[old];
    sessionStorage.setItem(JOB_PROMPTS, JSON.stringify(kept));
  }

  function announce(message) {
    $("jobs-status").textContent = message;
  }

  function showJobsMessage() {
    const message = $("jobs-message");
    if (state.jobs.size === 0 && !message.dataset.problem) {
      message.textContent = "No jobs yet.";
    }
    message.hidden = state.jobs.size > 0 && !message.dataset.problem;
  }

  function jobsProblem(text) {
    const message = $("jobs-message");
    message.dataset.problem = text ? "1" : "";
    message.textContent = text;
    message.hidden = !text;
    if (!text) showJobsMessage();
  }

  function jobButton(className, text, label, onClick) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = `secondary ${className}`;
    button.textContent = text;
    button.setAttribute("aria-label", label);
    button.addEventListener("click", onClick);
    return button;
  }

  function jobRow(id) {
    const row = document.createElement("li");
    row.className = "job";
    row.dataset.id = id;
    const head = document.createElement("div");
    head.className = "job-head";
    const code = document.createElement("code");
    code.className = "job-id";
    code.textContent = id;
    const jobState = document.createElement("span");
    jobState.className = "job-state";
    const time = document.createElement("time");
    time.className = "job-time";
    head.append(code, jobState, time);

    const prompt = document.createElement("p");
    prompt.className = "job-prompt";

    const progress = document.createElement("div");
    progress.className = "job-progress";
    const bar = document.createElement("progress");
    bar.setAttribute("aria-label", `Progress of job ${id}`);
    const steps = document.createElement("span");
    steps.className = "job-steps";
    progress.append(bar, steps);

    const error = document.createElement("p");
    error.className = "job-error";
    error.hidden = true;

    const actions = document.createElement("div");
    actions.className = "job-actions";
    actions.append(
      jobButton("job-show", "Show images", `Show images of job ${id}`, () => openJob(id)),
      jobButton("job-cancel", "Cancel", `Cancel job ${id}`, () => cancelJob(id)),
      jobButton("job-delete", "Delete", `Delete job ${id}`, () => deleteJob(id)),
    );
    row.append(head, prompt, progress, error, actions);
    return row;
  }

  function renderJob(entry) {
    const { view, row } = entry;
    const finished = FINISHED.includes(view.state);
    row.dataset.state = view.state;
    const jobState = row.querySelector(".job-state");
    jobState.textContent = view.cancel_requested && !finished ? "cancelling" : view.state;
    jobState.className = `job-state state-${view.state}`;
    if (typeof view.created_at === "number") {
      const created = new Date(view.created_at * 1000);
      row.querySelector(".job-time").dateTime = created.toISOString();
      row.querySelector(".job-time").textContent = created.toLocaleString();
    }
    const prompt = prompts()[view.id];
    const promptLine = row.querySelector(".job-prompt");
    promptLine.textContent = prompt || (view.route && view.route !== "/score" ? view.route : "");
    promptLine.hidden = !promptLine.textContent;

    // Steps over all of the request's images; 0 of 0 until the first step has been recorded.
    const progress = view.progress || {};
    const step = Number(progress.step) || 0;
    const steps = Number(progress.steps) || 0;
    const bar = row.querySelector("progress");
    const stepsText = row.querySelector(".job-steps");
    if (steps > 0) {
      bar.max = steps;
      bar.value = view.state === "succeeded" ? steps : Math.min(step, steps);
      stepsText.textContent = `${view.state === "succeeded" ? steps : step} / ${steps} steps`;
    } else if (view.state === "succeeded") {
      bar.max = 1;
      bar.value = 1;
      stepsText.textContent = "done";
    } else {
      bar.removeAttribute("value"); // indeterminate: running, its steps not known yet
      stepsText.textContent = view.state === "queued" ? "waiting in the queue" : finished ? "" : "starting";
    }
    bar.hidden = view.state === "queued" || (!steps && finished && view.state !== "succeeded");

    const error = row.querySelector(".job-error");
    const message = view.error && typeof view.error.message === "string" ? view.error.message : "";
    error.textContent = view.state === "failed" ? message || "The job failed." : "";
    error.hidden = !error.textContent;

    row.querySelector(".job-show").hidden = view.state !== "succeeded";
    row.querySelector(".job-cancel").hidden = finished;
    row.querySelector(".job-cancel").disabled = Boolean(view.cancel_requested);
  }

  // Rows newest first, as GET /v1/jobs lists them.
  function placeRow(entry) {
    const list = $("jobs-list");
    const created = entry.view.created_at || 0;
    const newer = (row) => (state.jobs.get(row.dataset.id)?.view.created_at || 0) >= created;
    const after = [...list.children].find((row) => !newer(row));
    if (after) list.insertBefore(entry.row, after);
    else list.append(entry.row);
  }

  // A job as the server shows it, from a submit, a poll, a cancel or the list: shown, and followed
  // (polled about once a second) until it is finished. show: open its images once it succeeds.
  function followJob(view, show = false) {
    if (!view || typeof view.id !== "string") return;
    let entry = state.jobs.get(view.id);
    const fresh = !entry;
    if (fresh) {
      entry = { view, timer: null, show, row: jobRow(view.id) };
      state.jobs.set(view.id, entry);
    }
    const was = entry.view.state;
    // The list leaves results out: keep one a poll brought.
    entry.view = { ...view, result: view.result ?? (view.state === entry.view.state ? entry.view.result : null) };
    entry.show = entry.show || show;
    renderJob(entry);
    if (fresh) placeRow(entry);
    showJobsMessage();
    if (!FINISHED.includes(view.state)) {
      if (entry.timer === null) entry.timer = setTimeout(() => pollJob(view.id), POLL_MS);
      return;
    }
    clearTimeout(entry.timer);
    entry.timer = null;
    if (!fresh && was !== view.state) announce(`Job ${view.id} ${view.state}.`);
    if (entry.show) {
      entry.show = false;
      if (view.state === "succeeded") openJob(view.id);
      else if (view.state === "failed") {
        showError(view.error && view.error.message ? view.error.message : "The job failed.", `job ${view.id}`);
      }
    }
  }

  function forgetJob(id) {
    const entry = state.jobs.get(id);
    if (!entry) return;
    clearTimeout(entry.timer);
    state.jobs.delete(id);
    entry.row.remove();
    showJobsMessage();
  }

  function jobCallFailed(error, id) {
    if (error.status === 401) {
      askForKey(error.message, false);
    } else {
      showError(describe(error), error.requestId ? `request id ${error.requestId}` : `job ${id}`);
    }
  }

  async function pollJob(id) {
    const entry = state.jobs.get(id);
    if (!entry) return;
    entry.timer = null;
    try {
      const { text } = await call(jobPath(id));
      if (state.jobs.get(id) === entry) followJob(parseWithStringSeeds(text));
    } catch (error) {
      if (state.jobs.get(id) !== entry) return; // deleted meanwhile
      if (error.status === 404) {
        forgetJob(id); // expired, or deleted elsewhere
        announce(`Job ${id} is gone: ${error.message}`);
      } else if (error.status === 401) {
        askForKey(error.message, false); // listed again, and followed, once a key is given
      } else {
        // Unreachable for now (a restart, say): the job lives on in the server; try again shortly.
        noteOnRow(entry, describe(error));
        if (entry.timer === null) entry.timer = setTimeout(() => pollJob(id), RETRY_MS);
      }
    }
  }

  function noteOnRow(entry, message) {
    const error = entry.row.querySelector(".job-error");
    error.textContent = message;
    error.hidden = false;
  }

  // Its images, shown as a direct generation shows them (a listed job's result is fetched first).
  async function openJob(id) {
    const entry = state.jobs.get(id);
    if (!entry) return;
    let view = entry.view;
    try {
      if (view.result === null || view.result === undefined) {
        const { text } = await call(jobPath(id));
        view = parseWithStringSeeds(text);
        if (state.jobs.get(id) === entry) followJob(view);
      }
      const items = imagesOf(view.result);
      if (!items) {
        throw new ApiError(`Job ${id} has no images to show (route ${view.route}, ${view.state}).`, 200, "");
      }
      const prompt = prompts()[id] || "";
      const elapsed = view.finished_at && view.created_at ? (view.finished_at - view.created_at) * 1000 : 0;
      $("error").hidden = true;
      showResults(items, prompt, elapsed, id, "job");
    } catch (error) {
      jobCallFailed(error, id);
    }
  }

  // A finished job's result, as the records imageCard takes: /score's own list, or the images of
  // the other generation routes a caller may have submitted jobs to with the same key.
  function imagesOf(result) {
    if (Array.isArray(result)) return result.filter((item) => item && typeof item.generated_image === "string");
    if (!result || typeof result !== "object") return null;
    if (Array.isArray(result.data)) {
      const items = result.data.filter((item) => item && typeof item.b64_json === "string");
      return items.map((item) => ({ generated_image: item.b64_json, prompt: item.revised_prompt }));
    }
    if (Array.isArray(result.images)) {
      const images = result.images.filter((image) => typeof image === "string");
      return images.map((image) => ({ generated_image: image }));
    }
    if (result.content_type === "image/png" && typeof result.base64 === "string") {
      return [{ generated_image: result.base64 }];
    }
    return null;
  }

  async function cancelJob(id) {
    const entry = state.jobs.get(id);
    if (!entry) return;
    entry.row.querySelector(".job-cancel").disabled = true;
    try {
      const { text } = await call(jobPath(id, "/cancel"), { method: "POST" });
      announce(`Cancelling job ${id}.`);
      if (state.jobs.get(id) === entry) followJob(parseWithStringSeeds(text));
    } catch (error) {
      if (state.jobs.get(id) !== entry) return;
      entry.row.querySelector(".job-cancel").disabled = false;
      if (error.status === 404) forgetJob(id);
      jobCallFailed(error, id);
    }
  }

  async function deleteJob(id) {
    const entry = state.jobs.get(id);
    if (!entry) return;
    entry.row.querySelector(".job-delete").disabled = true;
    try {
      await call(jobPath(id), { method: "DELETE" });
      forgetJob(id);
      announce(`Job ${id} deleted.`);
    } catch (error) {
      if (error.status === 404) {
        forgetJob(id); // already gone: what the user asked for
        return;
      }
      entry.row.querySelector(".job-delete").disabled = false;
      jobCallFailed(error, id);
    }
  }

  // The caller's recent jobs (with the page's key, when the server has keys); unfinished ones are
  // followed again, so that closing or reloading the page loses nothing.
  async function loadJobs() {
    try {
      const { text } = await call(`v1/jobs?limit=${JOBS_LISTED}`);
      const listed = parseWithStringSeeds(text);
      jobsProblem("");
      $("as-job").disabled = false;
      for (const view of Array.isArray(listed.data) ? listed.data : []) followJob(view);
      // And those of this page that left the list, or whose polls stopped for a key: followed again.
      for (const [id, entry] of state.jobs) {
        if (FINISHED.includes(entry.view.state) || entry.timer !== null) continue;
        entry.timer = setTimeout(() => pollJob(id), 0);
      }
    } catch (error) {
      if (error.status === 401) {
        jobsProblem("Your jobs are listed once the page has an API key.");
      } else if (error.status === 501) {
        jobsProblem(`This server keeps no jobs: ${error.message}`);
        $("as-job").checked = false;
        $("as-job").disabled = true;
      } else {
        jobsProblem(`Your jobs could not be listed: ${describe(error)}`);
      }
    }
  }

  function reuseSeed(event) {
    const button = event.target.closest("button.seed");
    if (!button) return;
    $("seed").value = button.dataset.seed;
    $("seed").focus();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("generate-form").addEventListener("submit", (event) => {
      event.preventDefault();
      generate();
    });
    $("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        generate();
      }
    });
    $("key-form").addEventListener("submit", useKey);
    $("images").addEventListener("click", reuseSeed);
    $("image-file").addEventListener("change", chooseImage);
    $("image-preview").addEventListener("load", imageShown);
    $("image-preview").addEventListener("error", imageUnreadable);
    $("mask-canvas").addEventListener("pointerdown", startStroke);
    $("mask-canvas").addEventListener("pointermove", continueStroke);
    $("mask-canvas").addEventListener("pointerup", endStroke);
    $("mask-canvas").addEventListener("pointercancel", endStroke);
    $("clear-mask").addEventListener("click", clearMask);
    $("clear-image").addEventListener("click", clearImage);
    $("jobs-refresh").addEventListener("click", loadJobs);
    $("brush-size").addEventListener("input", showBrush);
    $("strength").addEventListener("input", () => {
      state.strengthSet = true;
      showStrength();
    });
    loadInfo();
    loadJobs();
  });
})();

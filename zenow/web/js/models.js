// The models view: per mode what runs, the registered models, the parameters; and downloads.
// Statuses, new models, parameter changes and download progress arrive as live events.

import { api, Unreachable } from "./api.js";
import { $, describeError, formatBytes, h } from "./dom.js";

export const MODES = ["llm", "embed", "rerank"];
const MODE_TITLES = { llm: "Chat (llm)", embed: "Embeddings (embed)", rerank: "Reranking (rerank)" };
const FLOAT_PARAMETERS = new Set(["temperature", "repeat_penalty", "top_p", "min_p"]);
const LONG_TEXT_PARAMETERS = new Set(["system_prompt"]);
const DOWNLOADS_SHOWN = 20;

export const STATUS_WORDS = {
  running: "running", starting: "starting", not_started: "not started", stopped: "stopped", error: "error",
};

export class ModelsView {
  constructor(app) {
    this.app = app;
    this.statuses = {};  // mode -> fields of GET /api/server/status
    this.models = {};  // mode -> [model]
    this.sizes = new Map();  // "mode/name" -> bytes, from model.registered events
    this.parameters = {};  // mode -> parameters
    this.notes = {};  // mode -> {text, kind}
    this.loadingModel = {};  // mode -> name being loaded by this page
    this.downloads = new Map();  // url -> download
    this.downloadModes = new Map();  // url -> mode (the status answer does not say it)
    this.cards = {};
    for (const mode of MODES) this.cards[mode] = this.buildCard(mode);
    $("mode-cards").replaceChildren(...MODES.map((mode) => this.cards[mode].root));
    $("download-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.startDownload();
    });
  }

  /** Everything fetched again: after connecting, and after a reconnect (events may have been missed). */
  async refresh() {
    const [list, downloads, ...parameters] = await Promise.all([
      api("/api/models/list"),
      api("/api/models/download/status"),
      ...MODES.map((mode) => api(`/api/models/get_param?mode=${mode}`)),
    ]);
    this.models = Object.fromEntries(MODES.map((mode) => [mode, list.models.filter((m) => m.mode === mode)]));
    MODES.forEach((mode, i) => this.setParameters(mode, parameters[i]));
    for (const download of downloads.downloads) {
      this.downloads.set(download.url, { ...this.downloads.get(download.url), ...download });
    }
    for (const mode of MODES) this.renderModels(mode);
    this.renderDownloads();
  }

  // ------------------------------------------------------------ the mode cards

  buildCard(mode) {
    const status = h("span", { class: "pill", "data-status": "unknown" }, "…");
    const model = h("span", { class: "mode-model" });
    const error = h("p", { class: "mode-error", role: "status", hidden: true });
    const list = h("ul", { class: "model-list", "aria-label": `${mode} models` });
    const note = h("p", { class: "form-message", role: "status" });
    const fields = h("div", { class: "parameter-fields" });
    const form = h("form", { class: "parameters", onsubmit: (event) => {
      event.preventDefault();
      this.saveParameters(mode);
    } }, fields, h("button", { type: "submit" }, "Save parameters"), note);
    const root = h("section", { class: "card mode-card", "data-mode": mode, "aria-label": MODE_TITLES[mode] },
      h("div", { class: "mode-head" }, h("h2", {}, MODE_TITLES[mode]), status),
      h("p", { class: "mode-line" }, model), error, list,
      h("details", { class: "parameter-details" }, h("summary", {}, "Parameters"), form));
    return { root, status, model, error, list, fields, note };
  }

  setStatus(mode, status) {
    this.statuses[mode] = status;
    const card = this.cards[mode];
    card.status.dataset.status = status.status;
    card.status.textContent = STATUS_WORDS[status.status] ?? status.status;
    card.model.textContent = status.model_name
      ? `Model: ${status.model_name}` : "No model loaded: load one below, or download one.";
    const reason = status.reason ? ` (${status.reason})` : "";
    card.error.hidden = !status.error_message && !reason;
    card.error.textContent = status.error_message || (reason ? `Stopped${reason}` : "");
    this.renderModels(mode);
  }

  sizeOf(model) {
    return model.details?.file_size ?? model.size ?? this.sizes.get(`${model.mode}/${model.name}`) ?? null;
  }

  renderModels(mode) {
    const card = this.cards[mode];
    const models = this.models[mode] ?? [];
    const status = this.statuses[mode] ?? {};
    if (!models.length) {
      card.list.replaceChildren(h("li", { class: "muted" }, "No models registered."));
      return;
    }
    card.list.replaceChildren(...models.map((model) => {
      const running = status.model_name === model.name && status.status === "running";
      const busy = this.loadingModel[mode] === model.name
        || (status.model_name === model.name && status.status === "starting");
      const details = model.details
        ? [model.details.parameter_size, model.details.quantization].filter(Boolean).join(" · ") : "";
      return h("li", { class: "model-row", "data-model": model.name },
        h("span", { class: "model-name" }, model.name),
        h("span", { class: "model-size" }, formatBytes(this.sizeOf(model))),
        details ? h("span", { class: "model-details" }, details) : null,
        h("button", {
          type: "button",
          class: running ? "" : "primary",
          disabled: running || busy,
          onclick: () => this.load(mode, model.name),
        }, running ? "Loaded" : busy ? "Loading…" : "Load"));
    }));
  }

  async load(mode, name) {
    this.loadingModel[mode] = name;
    this.renderModels(mode);
    this.note(mode, "");
    try {
      await api("/api/models/load", { method: "POST", body: { model_name: name, mode } });
    } catch (error) {
      this.fail(error, (text) => this.note(mode, `Could not load ${name}: ${text}`, "error"));
    } finally {
      delete this.loadingModel[mode];
      this.renderModels(mode);
    }
  }

  note(mode, text, kind = "") {
    const note = this.cards[mode].note;
    note.textContent = text;
    note.dataset.kind = kind;
    if (text && kind === "error") this.cards[mode].root.querySelector("details").open = true;
  }

  fail(error, show) {
    if (error instanceof Unreachable) this.app.unreachable();
    show(describeError(error));
  }

  // ------------------------------------------------------------ parameters

  setParameters(mode, parameters) {
    this.parameters[mode] = parameters;
    if (mode === "llm") this.app.chatDefaults(parameters);
    const card = this.cards[mode];
    if (card.root.contains(document.activeElement) && card.fields.contains(document.activeElement)) return;
    card.fields.replaceChildren(...Object.entries(parameters).map(([name, value]) => parameterField(name, value)));
  }

  async saveParameters(mode) {
    const card = this.cards[mode];
    const changes = {};
    for (const input of card.fields.querySelectorAll("[data-parameter]")) {
      const name = input.dataset.parameter;
      const value = fieldValue(input, this.parameters[mode][name]);
      if (JSON.stringify(value) !== JSON.stringify(this.parameters[mode][name])) changes[name] = value;
    }
    if (!Object.keys(changes).length) {
      this.note(mode, "Nothing changed.");
      return;
    }
    try {
      const answer = await api(`/api/models/update_param?mode=${mode}`, { method: "POST", body: changes });
      const running = this.statuses[mode]?.status === "running";
      let text = "Saved: applies to the next request.";
      if (answer.requires_restart) {
        text = running ? "Saved: the server restarts to apply them." : "Saved: applies when the server next starts.";
      }
      this.note(mode, text, "ok");
      this.setParameters(mode, await api(`/api/models/get_param?mode=${mode}`));
    } catch (error) {
      this.fail(error, (text) => this.note(mode, text, "error"));
    }
  }

  // ------------------------------------------------------------ downloads

  async startDownload() {
    const message = $("download-message");
    const url = $("download-url").value.trim();
    const mode = $("download-mode").value;
    const body = { url, mode };
    const name = $("download-name").value.trim();
    if (name) body.filename = name.toLowerCase().endsWith(".gguf") ? name : `${name}.gguf`;
    const sha256 = $("download-sha256").value.trim();
    if (sha256) body.sha256 = sha256.toLowerCase();
    message.textContent = "";
    try {
      const answer = await api("/api/models/download", { method: "POST", body });
      this.downloadModes.set(answer.url, mode);
      message.textContent = answer.message;
      message.dataset.kind = "ok";
      $("download-form").reset();
    } catch (error) {
      message.dataset.kind = "error";
      this.fail(error, (text) => { message.textContent = text; });
    }
  }

  setDownload(download) {
    if (download.mode) this.downloadModes.set(download.url, download.mode);
    this.downloads.set(download.url, { ...this.downloads.get(download.url), ...download });
    this.renderDownloads();
  }

  renderDownloads() {
    const rows = [...this.downloads.values()].reverse().slice(0, DOWNLOADS_SHOWN);
    $("download-list").replaceChildren(...rows.map((d) => this.downloadRow(d)));
  }

  downloadRow(download) {
    const progress = Math.max(0, Math.min(100, download.progress ?? 0));
    const facts = [`${progress.toFixed(progress >= 100 ? 0 : 1)} %`];
    if (download.total) facts.push(`${formatBytes(download.downloaded)} of ${formatBytes(download.total)}`);
    else if (download.downloaded) facts.push(formatBytes(download.downloaded));
    if (download.status === "downloading" && download.speed) facts.push(`${formatBytes(download.speed)}/s`);
    if (download.status === "downloading" && download.eta) facts.push(`${Math.ceil(download.eta)} s left`);
    const mode = this.downloadModes.get(download.url);
    const actions = [];
    if (download.status === "downloading") {
      actions.push(h("button", { type: "button", onclick: () => this.cancel(download.url) }, "Cancel"));
    } else {
      if (download.status === "failed" && mode && !download.url.includes("***")) {
        actions.push(h("button", { type: "button", onclick: () => this.resume(download, mode) }, "Resume"));
      }
      actions.push(h("button", { type: "button", onclick: () => this.cancel(download.url, true) },
        download.status === "completed" ? "Remove from list" : "Discard"));
    }
    return h("li", { class: "download-row", "data-url": download.url, "data-status": download.status },
      h("div", { class: "download-head" },
        h("span", { class: "download-name" }, download.filename || download.url),
        mode ? h("span", { class: "muted" }, mode) : null,
        h("span", { class: "pill", "data-status": download.status }, download.status)),
      h("progress", { max: 100, value: progress, "aria-label": `${download.filename} progress` }),
      h("div", { class: "download-facts" }, facts.join(" · ")),
      download.error ? h("p", { class: "mode-error" }, download.error) : null,
      h("div", { class: "download-actions" }, actions));
  }

  async cancel(url, discard = false) {
    try {
      await api(`/api/models/download?url=${encodeURIComponent(url)}${discard ? "&discard=true" : ""}`,
        { method: "DELETE" });
      if (discard) {
        this.downloads.delete(url);
        this.renderDownloads();
      }
    } catch (error) {
      this.fail(error, (text) => { $("download-message").textContent = text; });
    }
  }

  async resume(download, mode) {
    try {
      await api("/api/models/download", { method: "POST", body: { url: download.url, mode, filename: download.filename } });
    } catch (error) {
      this.fail(error, (text) => { $("download-message").textContent = text; });
    }
  }

  // ------------------------------------------------------------ events

  onEvent(event) {
    switch (event.type) {
      case "snapshot":
        for (const [mode, status] of Object.entries(event.servers)) this.setStatus(mode, status);
        for (const download of event.downloads) this.setDownload(download);
        break;
      case "status":
        this.setStatus(event.mode, event);
        break;
      case "download":
        this.setDownload(event);
        break;
      case "model.registered": {
        const model = event.model;
        if (model.size !== null && model.size !== undefined) this.sizes.set(`${model.mode}/${model.name}`, model.size);
        const models = (this.models[model.mode] ??= []);
        const at = models.findIndex((m) => m.name === model.name);
        if (at >= 0) models[at] = { ...models[at], ...model };
        else models.push(model);
        this.renderModels(model.mode);
        break;
      }
      case "parameters":
        this.setParameters(event.mode, event.parameters);
        break;
      default:
        break;
    }
  }
}

function parameterField(name, value) {
  const label = name.replaceAll("_", " ");
  let input;
  if (typeof value === "boolean") {
    input = h("input", { type: "checkbox", checked: value });
  } else if (typeof value === "number") {
    input = h("input", { type: "number", step: FLOAT_PARAMETERS.has(name) ? "any" : "1", value: String(value) });
  } else if (LONG_TEXT_PARAMETERS.has(name)) {
    input = h("textarea", { rows: 3 });
    input.value = value ?? "";
  } else {
    const text = Array.isArray(value) ? value.join(", ") : value ?? "";
    input = h("input", { type: "text", value: String(text), placeholder: Array.isArray(value) ? "host:port, …" : "" });
  }
  input.dataset.parameter = name;
  input.name = name;
  return h("label", { class: typeof value === "boolean" ? "check" : "" }, label, input);
}

function fieldValue(input, current) {
  if (input.type === "checkbox") return input.checked;
  if (input.type === "number") return input.value === "" ? current : Number(input.value);
  if (Array.isArray(current)) return input.value.split(/[\s,]+/).filter(Boolean);
  if (current === null && input.value === "") return null;
  return input.value;
}

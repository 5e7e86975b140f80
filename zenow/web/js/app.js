// The page: finds zenow (and its API key), keeps the live events running, switches views,
// and says in one banner what stands in the way: zenow unreachable, or no chat model running.

import { apiKey, probe, setApiKey, Unreachable } from "./api.js";
import { ChatView } from "./chat.js";
import { $, describeError } from "./dom.js";
import { LiveEvents } from "./events.js";
import { ModelsView, STATUS_WORDS } from "./models.js";

const RETRY_FIRST_MS = 500;
const RETRY_MAX_MS = 5000;

class App {
  constructor() {
    this.connected = false;
    this.llmStatus = null;
    this.retryMs = RETRY_FIRST_MS;
    this.retryTimer = null;
    this.chat = new ChatView(this);
    this.models = new ModelsView(this);
    this.events = new LiveEvents((event) => this.onEvent(event), (up) => this.onConnection(up));
    window.addEventListener("hashchange", () => this.route());
    $("toggle-sessions").addEventListener("click", () => this.toggleSidebar());
    $("forget-key").addEventListener("click", () => {
      setApiKey("");
      this.start();
    });
    // The key is needed to go on: Escape does not close the dialog.
    $("key-dialog").addEventListener("cancel", (event) => event.preventDefault());
    $("key-form").addEventListener("submit", () => {
      setApiKey($("key-input").value.trim());
      $("key-input").value = "";
      this.start();
    });
  }

  /** Find zenow, ask for a key if it wants one, then listen to its events. */
  async start() {
    clearTimeout(this.retryTimer);
    this.events.close();
    const { reachable, keyAccepted } = await probe();
    if (!reachable) {
      this.onConnection(false);
      return;
    }
    $("forget-key").hidden = !apiKey();
    if (!keyAccepted) {
      this.showBanner("zenow needs an API key.", "warning");
      this.askForKey(apiKey() ? "zenow did not accept that key." : "");
      return;
    }
    this.events.connect();
  }

  /** Probe and connect again after a pause that grows while zenow stays away. */
  retryLater() {
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this.start(), this.retryMs);
    this.retryMs = Math.min(this.retryMs * 2, RETRY_MAX_MS);
  }

  askForKey(message) {
    $("key-message").textContent = message;
    const dialog = $("key-dialog");
    if (!dialog.open) dialog.showModal();
    $("key-input").focus();
  }

  async onConnection(up) {
    this.connected = up;
    this.renderBanner();
    if (!up) {
      this.retryLater();
      return;
    }
    this.retryMs = RETRY_FIRST_MS;
    // (Re)connected: the snapshot has the statuses; fetch what it does not carry.
    try {
      await Promise.all([this.chat.loadSessions(), this.models.refresh()]);
      this.route();
    } catch (error) {
      if (error instanceof Unreachable) this.unreachable();
      else this.showBanner(`zenow answered: ${describeError(error)}`, "error");
    }
  }

  onEvent(event) {
    if (event.type === "snapshot") this.setLlmStatus(event.servers.llm);
    else if (event.type === "status" && event.mode === "llm") this.setLlmStatus(event);
    this.chat.onEvent(event);
    this.models.onEvent(event);
  }

  setLlmStatus(status) {
    this.llmStatus = status;
    const pill = $("llm-pill");
    pill.dataset.status = status.status;
    const word = STATUS_WORDS[status.status] ?? status.status;
    pill.textContent = status.model_name ? `${status.model_name}: ${word}` : `llm: ${word}`;
    this.renderBanner();
  }

  // ------------------------------------------------------------ what the chat view asks

  llmRunning() {
    return this.llmStatus?.status === "running";
  }

  chatDefaults(parameters) {
    this.chat.setDefaults(parameters);
  }

  showSession(id) {
    const hash = id === null ? "#chat" : `#chat/${id}`;
    $("tab-chat").href = hash;  // back from Models to the same conversation
    if (location.hash !== hash && !$("chat-view").hidden) history.replaceState(null, "", hash);
  }

  unreachable() {
    if (this.connected) this.events.dropped(this.events.source);
  }

  // ------------------------------------------------------------ the banner

  renderBanner() {
    if (!this.connected) {
      this.showBanner("zenow is unreachable: trying again…", "error");
      return;
    }
    const status = this.llmStatus;
    if (!status || status.status === "running") {
      this.showBanner("");
    } else if (status.status === "starting") {
      this.showBanner(`The chat model ${status.model_name ?? ""} is starting…`, "info");
    } else {
      const why = status.error_message ? `: ${status.error_message}` : "";
      this.showBanner(`No chat model is running (llm ${STATUS_WORDS[status.status] ?? status.status}${why}). `
        + "Load one under Models.", "warning", true);
    }
  }

  showBanner(text, kind = "info", linkToModels = false) {
    const banner = $("banner");
    banner.hidden = !text;
    banner.dataset.kind = kind;
    banner.replaceChildren(text);
    if (linkToModels && location.hash !== "#models") {
      const link = document.createElement("a");
      link.href = "#models";
      link.textContent = "Open Models";
      banner.append(" ", link);
    }
  }

  /** Draw attention to the banner (a message was not sent because of what it says). */
  flashBanner() {
    const banner = $("banner");
    banner.classList.remove("flash");
    void banner.offsetWidth;  // restart the animation
    banner.classList.add("flash");
  }

  // ------------------------------------------------------------ views

  route() {
    const [view, id] = location.hash.replace(/^#/, "").split("/");
    const models = view === "models";
    $("chat-view").hidden = models;
    $("models-view").hidden = !models;
    $("tab-chat").setAttribute("aria-current", models ? "false" : "page");
    $("tab-models").setAttribute("aria-current", models ? "page" : "false");
    $("toggle-sessions").hidden = models;
    this.renderBanner();
    if (!models) {
      const wanted = id ? Number(id) : null;
      if (wanted !== this.chat.current && (wanted === null || this.chat.sessions.has(wanted))) this.chat.open(wanted);
    }
  }

  toggleSidebar() {
    const open = document.body.classList.toggle("sidebar-open");
    $("toggle-sessions").setAttribute("aria-expanded", String(open));
  }

  closeSidebar() {
    document.body.classList.remove("sidebar-open");
    $("toggle-sessions").setAttribute("aria-expanded", "false");
  }
}

new App().start();

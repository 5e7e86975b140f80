// The chat view: the sessions sidebar and one conversation, streamed from POST /api/chat.
//
// Every stored message has an id.  What this window sends is shown at once without one, and
// gets its id (and, for a reply, the text zenow stored) when the `session.message` event
// for it arrives; a message this window did not send (another window, another front end)
// is appended from its event.  So two windows on one session show the same conversation.

import { api, ApiError, streamChat, Unreachable } from "./api.js";
import { $, describeError, h } from "./dom.js";
import { renderMarkdown } from "./markdown.js";

const HISTORY_SHOWN = 500;
const DELETE_CONFIRM_MS = 5000;

export class ChatView {
  /**
   * @param {object} app `llmRunning()` says whether the chat model runs; `unreachable()` reports a lost zenow;
   *   `showSession(id)` puts the session in the page's address.
   */
  constructor(app) {
    this.app = app;
    this.sessions = new Map();  // id -> session (fields of GET /api/sessions/{id})
    this.current = null;  // the open session's id, or null for a new chat
    this.entries = [];  // {id, role, content, element, body}
    this.loading = null;  // events that arrived while the open session's messages load
    this.streaming = null;  // {controller, sessionId, reply}
    this.awaitingReply = null;  // the reply this window streamed, until zenow says it stored it
    this.defaults = {};
    this.bind();
  }

  bind() {
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      this.send();
    });
    $("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.send();
      }
    });
    $("stop").addEventListener("click", () => this.streaming?.controller.abort());
    $("new-chat").addEventListener("click", () => this.open(null));
    $("rename-session").addEventListener("click", () => this.startRename());
    $("rename-cancel").addEventListener("click", () => this.endRename());
    $("rename-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.rename();
    });
    $("rename-input").addEventListener("keydown", (event) => {
      if (event.key === "Escape") this.endRename();
    });
    $("delete-session").addEventListener("click", () => this.deleteCurrent());
    for (const id of ["temperature", "max-tokens"]) {
      $(id).addEventListener("change", () => this.saveOptions());
    }
  }

  // ------------------------------------------------------------ sessions

  async loadSessions() {
    const answer = await api("/api/sessions?limit=200");
    this.sessions.clear();
    for (const session of answer.sessions) this.sessions.set(session.id, session);
    this.renderSessions();
    if (this.current !== null && !this.sessions.has(this.current)) this.open(null);
  }

  renderSessions() {
    const list = $("session-list");
    const ordered = [...this.sessions.values()].sort(
      (a, b) => (b.updated_at || "").localeCompare(a.updated_at || "") || b.id - a.id);
    list.replaceChildren(...ordered.map((session) => h("li", {},
      h("button", {
        type: "button",
        class: session.id === this.current ? "session-item current" : "session-item",
        "data-session-id": String(session.id),
        "aria-current": session.id === this.current ? "true" : false,
        onclick: () => this.open(session.id),
      }, h("span", { class: "session-name" }, session.session_name),
      h("span", { class: "session-meta" }, `${session.message_count ?? 0} messages`)))));
    const current = this.sessions.get(this.current);
    $("session-title").textContent = current ? current.session_name : "New chat";
    document.title = current ? `${current.session_name} · Zenow` : "Zenow";
    $("rename-session").hidden = $("delete-session").hidden = !current;
  }

  /** Show session `id` (null: a new chat), its messages loaded from zenow. */
  async open(id) {
    if (this.streaming && this.streaming.sessionId !== id) this.streaming.controller.abort();
    this.endRename();
    this.resetDelete();
    this.current = id;
    this.entries = [];
    this.awaitingReply = null;
    $("messages").replaceChildren();
    this.renderSessions();
    this.loadOptions();
    this.app.showSession(id);
    this.app.closeSidebar();
    this.updateEmpty();
    if (id === null) {
      $("prompt").focus();
      return;
    }
    const pending = [];
    this.loading = pending;
    try {
      const answer = await api(`/api/sessions/${id}/messages?limit=${HISTORY_SHOWN}`);
      if (this.current !== id) return;
      for (const message of answer.messages) this.addEntry(message);
    } catch (error) {
      if (this.current !== id) return;
      if (error instanceof ApiError && error.status === 404) {
        this.sessions.delete(id);
        this.open(null);
        return;
      }
      this.report(error);
    } finally {
      if (this.loading === pending) this.loading = null;
    }
    for (const message of pending) this.messageStored(message);
    this.updateEmpty();
    this.scrollDown();
  }

  startRename() {
    const session = this.sessions.get(this.current);
    if (!session) return;
    $("rename-input").value = session.session_name;
    $("rename-form").hidden = false;
    $("session-title").hidden = true;
    $("rename-input").focus();
    $("rename-input").select();
  }

  endRename() {
    $("rename-form").hidden = true;
    $("session-title").hidden = false;
  }

  async rename() {
    const id = this.current;
    const name = $("rename-input").value.trim();
    if (id === null || !name) return;
    try {
      await api(`/api/sessions/${id}/name`, { method: "PUT", body: { new_name: name } });
      this.renamed(id, name.split(/\s+/).join(" "));
      this.endRename();
    } catch (error) {
      this.report(error);
    }
  }

  async deleteCurrent() {
    const button = $("delete-session");
    const id = this.current;
    if (id === null) return;
    if (!button.dataset.confirm) {  // the first click arms the button; the second deletes
      button.dataset.confirm = "yes";
      button.textContent = "Confirm delete";
      this.deleteTimer = setTimeout(() => this.resetDelete(), DELETE_CONFIRM_MS);
      return;
    }
    this.resetDelete();
    try {
      await api(`/api/sessions/${id}`, { method: "DELETE" });
      this.deleted(id);
    } catch (error) {
      this.report(error);
    }
  }

  resetDelete() {
    clearTimeout(this.deleteTimer);
    const button = $("delete-session");
    delete button.dataset.confirm;
    button.textContent = "Delete";
  }

  // ------------------------------------------------------------ per-chat options

  optionsKey(id) {
    return `zenow.chat.${id ?? "new"}`;
  }

  loadOptions() {
    let saved = {};
    try {
      saved = JSON.parse(localStorage.getItem(this.optionsKey(this.current)) || "{}");
    } catch {
      saved = {};
    }
    $("temperature").value = saved.temperature ?? "";
    $("max-tokens").value = saved.max_tokens ?? "";
  }

  saveOptions(id = this.current) {
    const options = this.options();
    if (options === null) return;
    localStorage.setItem(this.optionsKey(id), JSON.stringify(options));
  }

  /** The chat's temperature and max tokens as the request takes them; null when one is invalid. */
  options() {
    const result = {};
    for (const [field, name] of [["temperature", "temperature"], ["max-tokens", "max_tokens"]]) {
      const input = $(field);
      if (!input.checkValidity()) {
        input.reportValidity();
        return null;
      }
      if (input.value !== "") result[name] = Number(input.value);
    }
    return result;
  }

  /** The llm parameters: their temperature and max tokens are the defaults the inputs show. */
  setDefaults(parameters) {
    this.defaults = parameters;
    $("temperature").placeholder = parameters.temperature ?? "";
    $("max-tokens").placeholder = parameters.max_tokens ?? "";
  }

  // ------------------------------------------------------------ sending

  async send() {
    const prompt = $("prompt");
    const text = prompt.value;
    if (!text.trim() || this.streaming) return;
    const options = this.options();
    if (options === null) return;
    if (!this.app.llmRunning()) {
      this.app.flashBanner();
      return;
    }
    prompt.value = "";
    let id = this.current;
    const controller = new AbortController();
    this.streaming = { controller, sessionId: id, reply: null };
    this.setStreaming(true);
    try {
      if (id === null) {
        const created = await api("/api/sessions", { method: "POST", body: { first_message: text } });
        id = created.session_id;
        this.saveOptions(id);
        localStorage.removeItem(this.optionsKey(null));
        if (!this.sessions.has(id)) {
          this.sessions.set(id, { id, session_name: created.session_name, message_count: 0,
                                  updated_at: new Date().toISOString() });
        }
        this.streaming.sessionId = id;
        await this.open(id);
      }
      this.addEntry({ id: null, role: "user", content: text });
      const reply = this.addEntry({ id: null, role: "assistant", content: "" });
      reply.element.classList.add("streaming");
      this.streaming.reply = reply;
      this.awaitingReply = reply;
      this.updateEmpty();
      const { stopped } = await streamChat(
        { session_id: id, messages: [{ role: "user", content: text }], ...options },
        { signal: controller.signal, onDelta: (delta) => this.appendDelta(reply, delta) },
      );
      if (stopped) reply.element.classList.add("stopped");
      if (!reply.content && this.awaitingReply === reply) this.awaitingReply = null;  // nothing to store
    } catch (error) {
      const reply = this.streaming?.reply;
      if (reply) reply.element.classList.add("failed");
      if (reply && !reply.content && this.awaitingReply === reply) this.awaitingReply = null;
      this.report(error, reply);
      if (!reply && prompt.value === "") prompt.value = text;  // nothing was sent: keep what was typed
    } finally {
      this.streaming?.reply?.element.classList.remove("streaming");
      this.streaming = null;
      this.setStreaming(false);
    }
  }

  setStreaming(on) {
    $("stop").hidden = !on;
    $("send").hidden = on;
    if (!on) $("prompt").focus();
  }

  appendDelta(entry, delta) {
    if (entry.id !== null) return;  // zenow already stored the whole reply: its text is final
    entry.content += delta;
    if (!entry.frame) {  // render at most once a frame, however fast the tokens come
      entry.frame = requestAnimationFrame(() => {
        entry.frame = null;
        this.renderBody(entry);
        this.scrollDown();
      });
    }
  }

  // ------------------------------------------------------------ the conversation

  addEntry(message) {
    const body = h("div", { class: "message-body" });
    const element = h("li", { class: `message ${message.role}`, "data-role": message.role },
      h("div", { class: "message-role" }, message.role === "assistant" ? "Zenow" : message.role),
      body);
    if (message.id !== null) element.dataset.messageId = String(message.id);
    const entry = { id: message.id, role: message.role, content: message.content, element, body, frame: null };
    this.renderBody(entry);
    this.entries.push(entry);
    $("messages").append(element);
    this.scrollDown();
    return entry;
  }

  renderBody(entry) {
    if (entry.role === "assistant") entry.body.innerHTML = renderMarkdown(entry.content);
    else entry.body.textContent = entry.content;
  }

  updateEmpty() {
    $("empty-chat").hidden = this.entries.length > 0;
  }

  scrollDown() {
    const list = $("messages");
    list.scrollTop = list.scrollHeight;
  }

  /** Show `error` in the conversation (in `entry` when given), or the unreachable banner. */
  report(error, entry = null) {
    if (error instanceof Unreachable) this.app.unreachable();
    const text = describeError(error);
    if (entry) {
      entry.element.append(h("p", { class: "message-error", role: "alert" }, text));
    } else {
      const note = h("li", { class: "message error", role: "alert" }, text);
      $("messages").append(note);
      setTimeout(() => note.remove(), 8000);
    }
  }

  // ------------------------------------------------------------ events

  onEvent(event) {
    switch (event.type) {
      case "session.created":
        this.sessions.set(event.session.id, event.session);
        this.renderSessions();
        break;
      case "session.renamed":
        this.renamed(event.session_id, event.session_name);
        break;
      case "session.deleted":
        this.deleted(event.session_id);
        break;
      case "session.cleared":
        if (event.session_id === this.current) this.open(this.current);
        this.touch(event.session_id, { message_count: 0 });
        break;
      case "session.message":
        this.touch(event.session_id, { updated_at: event.message.created_at }, 1);
        if (event.session_id !== this.current) break;
        if (this.loading) this.loading.push(event.message);
        else this.messageStored(event.message);
        break;
      default:
        break;
    }
  }

  touch(id, fields, addMessages = 0) {
    const session = this.sessions.get(id);
    if (!session) return;
    Object.assign(session, fields);
    if (addMessages) session.message_count = (session.message_count ?? 0) + addMessages;
    this.renderSessions();
  }

  renamed(id, name) {
    const session = this.sessions.get(id);
    if (session) session.session_name = name;
    this.renderSessions();
  }

  deleted(id) {
    this.sessions.delete(id);
    if (this.current === id) this.open(null);
    else this.renderSessions();
  }

  /** A message zenow stored in the open session: give ours its id, or append another's. */
  messageStored(message) {
    if (this.entries.some((entry) => entry.id === message.id)) return;
    const mine = message.role === "assistant"
      ? this.entries.find((entry) => entry.id === null && entry === this.awaitingReply)
      : this.entries.find((entry) => entry.id === null && entry.role === message.role
        && entry.content === message.content);
    if (!mine) {
      this.addEntry(message);
      this.updateEmpty();
      return;
    }
    mine.id = message.id;
    if (mine === this.awaitingReply) this.awaitingReply = null;
    mine.element.dataset.messageId = String(message.id);
    if (mine.content !== message.content) {
      mine.content = message.content;
      this.renderBody(mine);
    }
  }
}

// Zenow's HTTP API as the page uses it: JSON calls, the streamed chat, the API key.
// Everything here talks to the origin that served the page.

const KEY_STORAGE = "zenow.apiKey";

/** The API key kept in this browser, or "" when none. */
export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

/** zenow answered with an error status; `detail` is its explanation. */
export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
    this.detail = detail;
  }
}

/** Nothing answered (zenow stopped, or the network is gone). */
export class Unreachable extends Error {
  constructor() {
    super("zenow is unreachable");
  }
}

function headers(withBody) {
  const result = {};
  const key = apiKey();
  if (key) result.Authorization = `Bearer ${key}`;
  if (withBody) result["Content-Type"] = "application/json";
  return result;
}

async function send(path, { method = "GET", body, signal } = {}) {
  try {
    return await fetch(path, {
      method,
      headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new Unreachable();
  }
}

async function errorOf(response) {
  const text = await response.text();
  let detail = text || response.statusText;
  try {
    const data = JSON.parse(text);
    detail = data.detail ?? data.error?.message ?? data.error ?? detail;
  } catch {
    // not JSON: the text itself says it
  }
  return new ApiError(response.status, String(detail));
}

/** Call `path` and return its JSON answer; throws ApiError or Unreachable. */
export async function api(path, options = {}) {
  const response = await send(path, options);
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

/** `GET /api/health`: {reachable, keyAccepted}.  zenow says its version only to a request
 * whose key it accepts (or when it has no keys), so a missing version means a key is needed. */
export async function probe() {
  try {
    const response = await send("/api/health");
    const data = await response.json();
    return { reachable: true, keyAccepted: typeof data.version === "string" };
  } catch {
    // Nothing answered, or something that is not zenow did: either way, try again later.
    return { reachable: false, keyAccepted: false };
  }
}

/**
 * `POST /api/chat` with `stream: true`: calls `onDelta(text)` for each piece of the reply
 * as it arrives.  Resolves to {stopped} when the stream ended ([DONE]) or `signal` aborted
 * it (zenow then stops generating and keeps the partial reply).  Throws ApiError when the
 * chat is refused or fails mid-stream, Unreachable when nothing answers.
 */
export async function streamChat(body, { signal, onDelta }) {
  let response;
  try {
    response = await send("/api/chat", { method: "POST", body: { ...body, stream: true }, signal });
  } catch (error) {
    if (error.name === "AbortError") return { stopped: true };
    throw error;
  }
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) return { stopped: false };
      buffer += decoder.decode(value, { stream: true });
      let end;
      // An event ends with a blank line; zenow writes whole events, but a read may hold several or half of one.
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trimStart();
          if (data === "[DONE]") return { stopped: false };
          const chunk = JSON.parse(data);
          if (chunk.error) throw new ApiError(502, String(chunk.error));
          const content = chunk.choices?.[0]?.delta?.content;
          if (content) onDelta(content);
        }
      }
    }
  } catch (error) {
    if (error.name === "AbortError") return { stopped: true };
    if (error instanceof TypeError) throw new Unreachable();
    throw error;
  } finally {
    reader.releaseLock();
  }
}

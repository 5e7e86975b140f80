// The live events (`GET /api/events`): one EventSource at a time.
// The first event of each connection is a `snapshot` of every mode's status and the running
// downloads; listeners refresh whatever they show from it, since events may have been missed
// while the connection was down.  When the stream drops, `onConnection(false)` is told once and
// the owner decides when to connect again (it probes zenow first: the key may have changed).

import { apiKey } from "./api.js";

export class LiveEvents {
  /**
   * @param {(event: object) => void} onEvent every event, snapshot included
   * @param {(connected: boolean) => void} onConnection true at each snapshot, false when the stream drops
   */
  constructor(onEvent, onConnection) {
    this.onEvent = onEvent;
    this.onConnection = onConnection;
    this.source = null;
  }

  /** (Re)connect now, with the current API key. */
  connect() {
    this.close();
    const key = apiKey();
    // An EventSource cannot send headers: zenow takes the key as ?api_key= on this route only.
    const url = key ? `/api/events?api_key=${encodeURIComponent(key)}` : "/api/events";
    const source = new EventSource(url);
    this.source = source;
    source.onmessage = (message) => {
      const event = JSON.parse(message.data);
      if (event.type === "snapshot") this.onConnection(true);
      this.onEvent(event);
      if (event.type === "overflow") this.dropped(source);  // zenow ends the stream after it
    };
    source.onerror = () => this.dropped(source);
  }

  dropped(source) {
    if (source !== this.source) return;
    this.close();
    this.onConnection(false);
  }

  close() {
    if (this.source) {
      this.source.onmessage = this.source.onerror = null;
      this.source.close();
      this.source = null;
    }
  }
}

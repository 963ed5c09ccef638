// Server-Sent Events from GET /stream, read with fetch() so that the
// Authorization header can be sent (EventSource cannot send headers).

import { apiUrl, authHeaders, apiKey, askForKey } from "./api.js";

/** Parse SSE text: yields {event, data} for each complete event in `buffer`. */
export function parseEvents(buffer) {
  const events = [];
  const blocks = buffer.split(/\r?\n\r?\n/);
  const rest = blocks.pop();
  for (const block of blocks) {
    let event = "message";
    const data = [];
    for (const line of block.split(/\r?\n/)) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    if (data.length) events.push({ event, data: data.join("\n") });
  }
  return { events, rest };
}

/**
 * Keep a stream open, reconnecting with backoff. `onEvent(name, payload)` gets
 * each event; `onState(state)` gets "connecting" | "live" | "error".
 */
export function openStream({ onEvent, onState }) {
  let controller = null;
  let stopped = false;
  let delay = 1000;

  async function once() {
    controller = new AbortController();
    onState("connecting");
    const response = await fetch(apiUrl("/stream"), {
      headers: { Accept: "text/event-stream", ...authHeaders() },
      signal: controller.signal,
      cache: "no-store",
    });
    if (response.status === 401) {
      onState("error");
      await askForKey(Boolean(apiKey()));
      return;
    }
    if (!response.ok || !response.body) throw new Error(`stream answered ${response.status}`);
    onState("live");
    delay = 1000;
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const parsed = parseEvents(buffer);
      buffer = parsed.rest;
      for (const { event, data } of parsed.events) {
        let payload;
        try {
          payload = JSON.parse(data);
        } catch {
          continue;
        }
        onEvent(event, payload);
      }
    }
  }

  async function loop() {
    while (!stopped) {
      try {
        await once();
      } catch (error) {
        if (stopped) return;
      }
      if (stopped) return;
      onState("error");
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 15000);
    }
  }

  loop();
  return {
    restart() {
      delay = 1000;
      controller?.abort();
    },
    stop() {
      stopped = true;
      controller?.abort();
    },
  };
}

// Browser readers, each used with its defaults, in real Chromium: `window.runReader(request)`
// resolves to {events: [{type, data, id}...], ended: "<how it stopped>"}.
//   request: {reader, url, method, headers, body}
import { fetchEventSource } from "./vendor/@microsoft/fetch-event-source/lib/esm/index.js";
import { handleStream } from "./dify_handle_stream.js";

class Done extends Error {}

function readWithFetchEventSource(request) {
  const events = [];
  return fetchEventSource(request.url, {
    method: request.method,
    headers: request.headers,
    body: request.body,
    onmessage: (e) => events.push({ type: e.event || "message", data: e.data, id: e.id }),
    onclose: () => {
      throw new Done("closed"); // its README: throw to stop it from reconnecting
    },
    onerror: (err) => {
      throw err; // and rethrow to stop retrying
    },
  }).then(
    () => ({ events, ended: "resolved" }),
    (err) => ({ events, ended: err instanceof Done ? "closed" : `error: ${err}` }),
  );
}

function readWithPolyfill(request) {
  const events = [];
  return new Promise((resolve) => {
    const es = new window.EventSourcePolyfill(request.url, { headers: request.headers });
    const keep = (e) => events.push({ type: e.type, data: e.data, id: e.lastEventId });
    es.onmessage = keep;
    es.addEventListener("ping", keep);
    es.onerror = (e) => {
      // The body ended: the polyfill reports an error and would reconnect.
      es.close();
      resolve({ events, ended: `error: ${e.error ? e.error.message : "none"}` });
    };
  });
}

async function readWithDifyHandleStream(request) {
  // As the template's ssePost calls it: fetch, then handleStream with one callback per event.
  const events = [];
  const response = await fetch(request.url, {
    method: request.method,
    headers: request.headers,
    body: request.body,
  });
  return new Promise((resolve) => {
    const on = (type) => (payload) => events.push({ type, data: JSON.stringify(payload), id: "" });
    handleStream(
      response,
      (message, isFirstMessage, moreInfo) =>
        events.push({ type: "onData", data: JSON.stringify([message, isFirstMessage, moreInfo]), id: "" }),
      (hasError) => resolve({ events, ended: `onCompleted(${hasError ?? ""})` }),
      on("onThought"),
      on("onMessageEnd"),
      on("onMessageReplace"),
      on("onFile"),
      on("onWorkflowStarted"),
      on("onWorkflowFinished"),
      on("onNodeStarted"),
      on("onNodeFinished"),
    );
  });
}

const readers = {
  "fetch-event-source": readWithFetchEventSource,
  "event-source-polyfill": readWithPolyfill,
  "dify-handle-stream": readWithDifyHandleStream,
};

window.runReader = (request) => readers[request.reader](request);
window.readersReady = true;

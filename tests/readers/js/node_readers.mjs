// Runs one published Node SSE reader against a URL and prints what it handed to the application,
// as JSON on stdout: {"events": [{"type", "data", "id"}...], "ended": "<how it stopped>"}.
//
// Usage: node node_readers.mjs '<json request>'
//   request: {reader: "eventsource" | "eventsource-parser", url, method, headers, body,
//             reconnect: bool (eventsource only: let it reconnect once and report how it ended)}
//
// Each reader is used the way its README shows; only the request (method, headers, body) is
// ours, because Dify's chat call is a POST and the proxy's needs a session.
import { EventSource } from "eventsource";
import { EventSourceParserStream } from "eventsource-parser/stream";

const request = JSON.parse(process.argv[2]);
const events = [];

function withRequest(input, init) {
  // eventsource's README way to send other headers or another method: a custom fetch.
  return fetch(input, {
    ...init,
    method: request.method,
    body: request.body,
    headers: { ...init.headers, ...request.headers },
  });
}

function readWithEventSource() {
  return new Promise((resolve) => {
    let opened = 0;
    const es = new EventSource(request.url, { fetch: withRequest });
    const keep = (e) => events.push({ type: e.type, data: e.data, id: e.lastEventId });
    es.onopen = () => {
      opened += 1;
    };
    es.onmessage = keep;
    es.addEventListener("ping", keep);
    es.addEventListener("error", (e) => {
      // The body ended: EventSource reports an error and reconnects after its retry delay.
      if (!request.reconnect || es.readyState === EventSource.CLOSED) {
        es.close();
        resolve({ ended: `error after ${opened} open(s), code ${e.code ?? "none"}` });
      }
    });
  });
}

async function readWithParser() {
  // eventsource-parser's README: decode the body's bytes, then parse the text stream.
  const response = await fetch(request.url, {
    method: request.method,
    headers: request.headers,
    body: request.body,
  });
  const stream = response.body
    .pipeThrough(new TextDecoderStream())
    .pipeThrough(new EventSourceParserStream());
  for await (const e of stream) {
    events.push({ type: e.event ?? "message", data: e.data, id: e.id ?? "" });
  }
  return { ended: `body ended, status ${response.status}` };
}

const readers = { eventsource: readWithEventSource, "eventsource-parser": readWithParser };
const outcome = await readers[request.reader]();
process.stdout.write(JSON.stringify({ events, ...outcome }));

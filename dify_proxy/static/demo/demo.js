// The /demo page: one question at a time, streamed through /api/chat by either SSE client.
//   EventSource polyfill: GET /api/chat?message=...; it reconnects by itself after the stream
//     ends, sending ?lastEventId=...; the proxy answers that with 204, which ends it for good.
//   fetch-event-source: POST /api/chat with a JSON body; a retry carries Last-Event-ID and gets
//     204 too. Keep-alives are Dify's own `event: ping` blocks: they reach onmessage with
//     event "ping" and empty data, and are skipped.
// Answer text is only ever set through textContent, never parsed as HTML.
import { fetchEventSource } from "../vendor/fetch-event-source/index.js";

const $ = (selector) => document.querySelector(selector);
const params = new URLSearchParams(location.search);

let conversationId = "";
let current = null; // the running question: see send()

// An answer the proxy will not resume (204) and an error worth showing: both stop retries.
class Finished extends Error {}
class Fatal extends Error {}

const HTTP_HINTS = {
  400: "bad request",
  401: "missing or invalid session",
  403: "cookie session from an origin that is not allowed",
  404: "not found",
  413: "request too large",
  415: "unsupported media type",
  429: "too many requests",
  502: "the chat service failed",
  503: "session keys unavailable",
  504: "the chat service timed out",
};

function apiBase() {
  return ($("#api").value.trim() || location.origin).replace(/\/+$/, "");
}

function choice(name) {
  return document.querySelector(`input[name="${name}"]:checked`).value;
}

function setChoice(name, value) {
  const input = document.querySelector(`input[name="${name}"][value="${CSS.escape(value)}"]`);
  if (input) input.checked = true;
}

function setStatus(state, text) {
  const status = $("#status");
  status.dataset.state = state;
  status.textContent = text;
}

function hint(text) {
  $("#hint").textContent = text;
}

// Headers and credentials for the chosen session: a Bearer header, or the @supabase/ssr cookie
// (sent with credentials, and then no Authorization header at all).
function session() {
  if (choice("auth") === "cookie") return { headers: {}, cookie: true };
  const token = $("#token").value.trim();
  return { headers: token ? { Authorization: `Bearer ${token}` } : {}, cookie: false };
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && typeof body.message === "string") {
      return `${body.message} (${response.status} ${body.code || ""})`.replace(" )", ")");
    }
  } catch {
    // not JSON: fall through
  }
  return `HTTP ${response.status} ${response.statusText}`.trim();
}

// --- one question ---------------------------------------------------------------------------

function addTurn(message) {
  const turn = document.createElement("li");
  turn.className = "turn";
  const question = document.createElement("p");
  question.className = "question";
  question.textContent = message;
  const answer = document.createElement("p");
  answer.className = "answer";
  turn.append(question, answer);
  $("#transcript").append(turn);
  return answer;
}

function handle(run, data) {
  if (run.ended) return;
  if (!run.taskId && data.task_id) run.taskId = data.task_id; // Stop needs it
  if (data.conversation_id) {
    conversationId = data.conversation_id; // follow-ups continue this conversation
    $("#conversation").textContent = conversationId;
  }
  switch (data.event) {
    case "message":
    case "agent_message":
      run.answer.textContent += data.answer || "";
      break;
    case "message_replace":
      run.answer.textContent = data.answer || "";
      break;
    case "message_end":
      finish(run, run.stopping ? "stopped" : "done");
      break;
    case "error":
      fail(run, data.message || data.code || "The chat service reported an error.");
      break;
    default:
      break; // workflow_started, node_finished, message_file, tts_message, ...
  }
}

function finish(run, state) {
  if (run.ended) return;
  run.ended = true;
  if (run === current) {
    setStatus(state, state);
    $("#stop").disabled = true;
  }
}

function fail(run, message) {
  if (run.ended) return;
  run.ended = true;
  if (run === current) {
    setStatus("error", message);
    $("#stop").disabled = true;
  }
}

function viaPolyfill(run, body, auth) {
  const url = new URL(`${apiBase()}/api/chat`);
  url.searchParams.set("message", body.message);
  if (body.conversation_id) url.searchParams.set("conversation_id", body.conversation_id);
  url.searchParams.set("inputs", JSON.stringify(body.inputs));
  // eslint-disable-next-line no-undef -- the global from eventsource.min.js
  const source = new EventSourcePolyfill(url.href, {
    headers: auth.headers,
    withCredentials: auth.cookie,
  });
  source.onmessage = (event) => {
    if (event.data) handle(run, JSON.parse(event.data));
  };
  source.onerror = (event) => {
    if (event.status === 204) {
      // The reconnect after the end (it carried lastEventId): the polyfill has closed itself.
      if (!run.ended) fail(run, "The connection was lost; the answer is incomplete.");
    } else if (event.status) {
      // Any other non-200 answer: the polyfill has closed itself and does not expose the body.
      const what = HTTP_HINTS[event.status] || event.statusText || "error";
      fail(run, `HTTP ${event.status}: ${what}`);
    } else if (!run.ended) {
      // No answer at all (refused by CORS, proxy down) or a stream cut mid-answer.
      source.close();
      fail(run, "The connection failed (network error, or refused by CORS).");
    }
    // Otherwise the stream has simply ended: the polyfill reconnects in a second and gets 204.
  };
  return () => source.close();
}

function viaFetch(run, body, auth) {
  const controller = new AbortController();
  let retries = 0;
  fetchEventSource(`${apiBase()}/api/chat`, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...auth.headers },
    credentials: auth.cookie ? "include" : "same-origin",
    body: JSON.stringify(body),
    signal: controller.signal,
    openWhenHidden: true, // otherwise every tab switch aborts and re-sends the question
    async onopen(response) {
      if (response.status === 204) throw new Finished(); // a retry of an answered question
      const type = response.headers.get("content-type") || "";
      if (response.ok && type.startsWith("text/event-stream")) return;
      throw new Fatal(await errorMessage(response)); // 4xx/5xx: the JSON error's message
    },
    onmessage(message) {
      if (message.event === "ping" || !message.data) return; // a keep-alive
      handle(run, JSON.parse(message.data));
    },
    onerror(error) {
      if (error instanceof Finished || error instanceof Fatal || retries >= 2) throw error;
      retries += 1;
      return 1000; // a network error: retry (with Last-Event-ID once an id was seen)
    },
  }).then(
    () => {
      if (!run.ended && !controller.signal.aborted) fail(run, "The stream ended early.");
    },
    (error) => {
      if (error instanceof Finished) {
        if (!run.ended) fail(run, "The connection was lost; the answer is incomplete.");
      } else {
        fail(run, error instanceof Fatal ? error.message : `Connection failed: ${error.message}`);
      }
    },
  );
  return () => controller.abort();
}

function send(message) {
  let inputs;
  try {
    inputs = JSON.parse($("#inputs").value || "{}");
  } catch {
    setStatus("error", "Inputs must be a JSON object.");
    return false;
  }
  if (current) current.close(); // e.g. a polyfill still waiting to reconnect
  const auth = session();
  const run = { answer: addTurn(message), auth, taskId: null, ended: false, stopping: false };
  current = run;
  setStatus("streaming", "streaming…");
  $("#stop").disabled = false;
  const body = { message, inputs };
  if (conversationId) body.conversation_id = conversationId;
  run.close = choice("transport") === "fetch" ? viaFetch(run, body, auth) : viaPolyfill(run, body, auth);
  return true;
}

// Stop asks the proxy to stop the task (Dify then ends the stream with message_end); without a
// task id yet, or if that fails, hanging up does the same: the proxy stops the task itself.
async function stop() {
  const run = current;
  if (!run || run.ended) return;
  run.stopping = true;
  setStatus("stopping", "stopping…");
  if (run.taskId) {
    try {
      const response = await fetch(`${apiBase()}/api/chat/${encodeURIComponent(run.taskId)}/stop`, {
        method: "POST",
        headers: run.auth.headers,
        credentials: run.auth.cookie ? "include" : "same-origin",
      });
      if (response.ok) return;
      hint(`Stop: ${await errorMessage(response)}; hanging up instead.`);
    } catch (error) {
      hint(`Stop: ${error.message}; hanging up instead.`);
    }
  }
  run.close();
  finish(run, "stopped");
}

async function getDevToken(quiet) {
  try {
    const response = await fetch(`${apiBase()}/demo/dev-token`, { method: "POST" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const { access_token: token } = await response.json();
    if (!quiet || !$("#token").value) $("#token").value = token;
    hint("Using a dev token from the local run (valid for an hour).");
  } catch {
    if (!quiet) hint("No dev token here (DEV_TOKENS is off, or another origin): paste one.");
  }
}

// --- wiring ---------------------------------------------------------------------------------

async function init() {
  $("#api").value = params.get("api") || location.origin;
  setChoice("transport", params.get("transport") || "polyfill");
  setChoice("auth", params.get("auth") || "bearer");
  $("#ask").addEventListener("submit", (event) => {
    event.preventDefault();
    const message = $("#message").value.trim();
    if (message && send(message)) $("#message").value = "";
  });
  $("#message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("#ask").requestSubmit();
    }
  });
  $("#stop").addEventListener("click", stop);
  $("#get-token").addEventListener("click", () => getDevToken(false));
  $("#new-conversation").addEventListener("click", () => {
    conversationId = "";
    $("#conversation").textContent = "new";
  });
  $("#settings").addEventListener("submit", (event) => event.preventDefault());
  if (typeof EventSourcePolyfill === "undefined") {
    setStatus("error", "The EventSource polyfill did not load: run scripts/setup.");
  }
  if (choice("auth") === "bearer" && !$("#token").value) await getDevToken(true);
  document.body.dataset.ready = "true";
}

init();

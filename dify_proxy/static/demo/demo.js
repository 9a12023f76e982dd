// The /demo page: one question at a time, streamed through /api/chat by either SSE client.
//   EventSource polyfill: GET /api/chat?message=...; when the connection drops it reconnects by
//     itself with ?lastEventId=<the last id it saw>, and the proxy sends the rest of the answer.
//     It also reconnects after a finished stream; the proxy answers that with 204 (nothing more
//     to resume), which ends it for good.
//   fetch-event-source: POST /api/chat with a JSON body; a retry after a network error carries
//     Last-Event-ID and gets the rest too. Keep-alives are Dify's own `event: ping` blocks: they
//     reach onmessage with event "ping" and empty data, and are skipped.
// A reloaded page resumes an unfinished answer: sessionStorage keeps the question and the id that
// opened its stream (`<stream>-0`), and the resume from that id replays the whole answer into the
// new, empty page, then follows it live (see resumeUnfinished).
// Answer text is only ever set through textContent, never parsed as HTML.
import { fetchEventSource } from "../vendor/fetch-event-source/index.js";

const $ = (selector) => document.querySelector(selector);
const params = new URLSearchParams(location.search);

let conversationId = "";
let current = null; // the running question: see send()

const UNFINISHED = "dify-proxy-demo:unfinished"; // sessionStorage: {question, resumeFrom}
// Consecutive failed reconnects before giving up: 1 + 2 + 4 + 8 s of waiting, well within the
// proxy's RESUME_GRACE (20 s by default), which is how long it keeps reading for a reconnect.
const MAX_RECONNECTS = 4;

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

// --- the unfinished answer, kept across reloads ----------------------------------------------

function keepUnfinished(run) {
  const saved = { question: run.question, resumeFrom: run.resumeFrom };
  try {
    sessionStorage.setItem(UNFINISHED, JSON.stringify(saved));
  } catch {
    // storage full or disabled: the answer just cannot survive a reload
  }
}

function forgetUnfinished() {
  try {
    sessionStorage.removeItem(UNFINISHED);
  } catch {
    // disabled: nothing was kept
  }
}

function savedUnfinished() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(UNFINISHED) || "null");
    return saved && typeof saved.question === "string" ? saved : null;
  } catch {
    return null;
  }
}

// Every event id is `<stream>-<n>` (the stream id itself may contain "-"). The first one seen
// names the stream; what is kept is its opening id, so that a resume replays the whole answer.
function noteId(run, id) {
  if (run.resumeFrom || !id || run.ended || run.stopping) return;
  const dash = id.lastIndexOf("-");
  if (dash <= 0) return;
  run.resumeFrom = `${id.slice(0, dash)}-0`;
  if (run === current) keepUnfinished(run);
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
    forgetUnfinished();
    setStatus(state, state);
    $("#stop").disabled = true;
  }
}

function fail(run, message) {
  if (run.ended) return;
  run.ended = true;
  if (run === current) {
    forgetUnfinished();
    setStatus("error", message);
    $("#stop").disabled = true;
  }
}

// A 204 on a reconnect or a resume: the proxy has nothing (more) to send. After the whole answer
// that is the normal end; before it, the answer can no longer be resumed (it expired, outgrew
// the record, or was abandoned after the grace).
const NOT_RESUMABLE = "The connection was lost and the answer can no longer be resumed; please ask again.";

function connected(run) {
  run.opened = true;
  run.failures = 0;
  if (run === current && !run.ended && !run.stopping) setStatus("streaming", "streaming…");
}

// A dropped connection after the stream had opened: the client reconnects with the last id it
// saw, and the proxy sends the rest. Returns false when it is time to give up.
function reconnecting(run) {
  run.failures += 1;
  if (run.failures > MAX_RECONNECTS) return false;
  if (run === current && !run.stopping) setStatus("reconnecting", "reconnecting…");
  return true;
}

// `body` is the question; `resumeFrom` instead resumes the answer after that event id.
function viaPolyfill(run, body, auth, resumeFrom) {
  const url = new URL(`${apiBase()}/api/chat`);
  if (resumeFrom) {
    // The polyfill's own reconnects replace this parameter with the last id they saw.
    url.searchParams.set("lastEventId", resumeFrom);
  } else {
    url.searchParams.set("message", body.message);
    if (body.conversation_id) url.searchParams.set("conversation_id", body.conversation_id);
    url.searchParams.set("inputs", JSON.stringify(body.inputs));
  }
  // eslint-disable-next-line no-undef -- the global from eventsource.min.js
  const source = new EventSourcePolyfill(url.href, {
    headers: auth.headers,
    withCredentials: auth.cookie,
  });
  source.onopen = () => connected(run);
  source.onmessage = (event) => {
    noteId(run, event.lastEventId); // the polyfill sees no id on the data-less opening ping
    if (event.data) handle(run, JSON.parse(event.data));
  };
  source.onerror = (event) => {
    if (event.status === 204) {
      // A reconnect (it carried lastEventId) with nothing more to send: the polyfill has closed
      // itself. After the whole answer that is the normal end.
      if (!run.ended) fail(run, NOT_RESUMABLE);
    } else if (event.status) {
      // Any other non-200 answer: the polyfill has closed itself and does not expose the body.
      const what = HTTP_HINTS[event.status] || event.statusText || "error";
      fail(run, `HTTP ${event.status}: ${what}`);
    } else if (run.ended) {
      // The stream has simply ended: the polyfill reconnects in a second and gets the 204.
    } else if (!run.opened) {
      // No answer at all: refused by CORS, or the proxy is down.
      source.close();
      fail(run, "The connection failed (network error, or refused by CORS).");
    } else if (!reconnecting(run)) {
      source.close();
      fail(run, "The connection was lost; the answer is incomplete.");
    }
    // Otherwise a stream cut mid-answer: the polyfill reconnects by itself (in 1, 2, 4, 8 s)
    // with ?lastEventId=..., and the proxy sends the rest of the answer.
  };
  return () => source.close();
}

// `body` is the question; `resumeFrom` instead resumes the answer after that event id.
function viaFetch(run, body, auth, resumeFrom) {
  const controller = new AbortController();
  const headers = { "Content-Type": "application/json", ...auth.headers };
  // Lower case, the library's own spelling: it overwrites this header with each id it sees.
  // Another spelling would be a second header, and the request would carry both ids.
  if (resumeFrom) headers["last-event-id"] = resumeFrom;
  fetchEventSource(`${apiBase()}/api/chat`, {
    method: "POST",
    headers,
    credentials: auth.cookie ? "include" : "same-origin",
    body: JSON.stringify(resumeFrom ? {} : body), // a resume is no question: the id says it all
    signal: controller.signal,
    openWhenHidden: true, // otherwise every tab switch aborts and re-sends the question
    async onopen(response) {
      if (response.status === 204) throw new Finished(); // nothing (more) to resume
      const type = response.headers.get("content-type") || "";
      if (response.ok && type.startsWith("text/event-stream")) return connected(run);
      throw new Fatal(await errorMessage(response)); // 4xx/5xx: the JSON error's message
    },
    onmessage(message) {
      noteId(run, message.id); // the opening ping already carries `<stream>-0`
      if (message.event === "ping" || !message.data) return; // a keep-alive
      handle(run, JSON.parse(message.data));
    },
    onclose() {
      // The proxy always ends an answer with message_end or error: anything else was a cut.
      if (!run.ended) throw new Error("The stream ended early.");
    },
    onerror(error) {
      if (error instanceof Finished || error instanceof Fatal) throw error;
      // A network error. Before the stream opened, a retry would send the question again:
      // twice is enough. After it, the retry carries Last-Event-ID and gets the rest.
      if (!run.opened) {
        run.failures += 1;
        if (run.failures > 2) throw error;
        return 1000;
      }
      if (!reconnecting(run)) throw error;
      return 1000 * 2 ** (run.failures - 1);
    },
  }).then(
    () => {
      if (!run.ended && !controller.signal.aborted) fail(run, "The stream ended early.");
    },
    (error) => {
      if (error instanceof Finished) {
        if (!run.ended) fail(run, NOT_RESUMABLE);
      } else if (error instanceof Fatal) {
        fail(run, error.message);
      } else if (run.opened) {
        fail(run, "The connection was lost; the answer is incomplete.");
      } else {
        fail(run, `Connection failed: ${error.message}`);
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
  const run = start(message);
  keepUnfinished(run); // the question; its stream's id follows with the first event
  const body = { message, inputs };
  if (conversationId) body.conversation_id = conversationId;
  const via = choice("transport") === "fetch" ? viaFetch : viaPolyfill;
  run.close = via(run, body, run.auth);
  return true;
}

function start(question) {
  if (current) current.close(); // e.g. a polyfill still waiting to reconnect
  const run = {
    question,
    answer: addTurn(question),
    auth: session(),
    taskId: null,
    resumeFrom: null, // `<stream>-0`, once an event id has named the stream
    opened: false,
    failures: 0,
    ended: false,
    stopping: false,
  };
  current = run;
  setStatus("streaming", "streaming…");
  $("#stop").disabled = false;
  return run;
}

// After a reload: the unfinished answer of this tab, replayed from its first event into the new
// page (the text shown before the reload went with the old page), then followed live. The proxy
// sends it without asking Dify again, and a finished answer is replayed whole.
function resumeUnfinished() {
  const saved = savedUnfinished();
  if (!saved) return;
  const run = start(saved.question);
  if (!saved.resumeFrom) {
    // Reloaded before the stream said its id (the polyfill learns it with the first event).
    fail(run, "The page was reloaded before the answer began; please ask again.");
    return;
  }
  run.resumeFrom = saved.resumeFrom;
  const via = choice("transport") === "fetch" ? viaFetch : viaPolyfill;
  run.close = via(run, null, run.auth, saved.resumeFrom);
}

// Stop asks the proxy to stop the task (Dify then ends the stream with message_end); without a
// task id yet, or if that fails, hanging up does the same: the proxy stops the task itself.
async function stop() {
  const run = current;
  if (!run || run.ended) return;
  run.stopping = true;
  forgetUnfinished(); // a reload now would not bring it back
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
  resumeUnfinished();
  document.body.dataset.ready = "true";
}

init();

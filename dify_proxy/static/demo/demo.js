// The /demo page: one question at a time, streamed through /api/chat by either SSE client.
//   EventSource polyfill: GET /api/chat?message=...; when the connection drops it reconnects by
//     itself with ?lastEventId=<the last id it saw>, and the proxy sends the rest of the answer.
//     It also reconnects after a finished stream; the proxy answers that with 204 (nothing more
//     to resume), which ends it for good.
//   fetch-event-source: POST /api/chat with a JSON body; a retry after a network error carries
//     Last-Event-ID and gets the rest too. Keep-alives are Dify's own `event: ping` blocks: they
//     reach onmessage with event "ping" and empty data, and are skipped.
// A chatflow that pauses for a person ends the stream with `human_input_required` (the form) and
// `workflow_paused`. The page shows the form under the answer; its buttons answer it, and the
// rest of the answer follows in the same paragraph:
//   fetch-event-source: POST /api/form/human_input/<form_token> reads the rest of the run on the
//     same request (it sends `Accept: text/event-stream`).
//   EventSource polyfill (GET only): first GET /api/workflow/<workflow_run_id>/events, which
//     waits with pings while the run is paused, then, once it is open, a plain fetch POSTs the
//     form; in that order, the stream cannot miss the start of the resumed run.
// A reloaded page picks up where it was: sessionStorage keeps the question, the answer shown
// before the current stream, and either the id that opened that stream (`<stream>-0`, with its
// route and client: the resume replays the whole stream into the new page, then follows it live;
// see resumeUnfinished) or, while paused, the form token and run id (the form is fetched again
// with GET /api/form/human_input/<form_token>; see reopenForm).
// Answer and form text is only ever set through textContent, never parsed as HTML.
import { fetchEventSource } from "../vendor/fetch-event-source/index.js";

const $ = (selector) => document.querySelector(selector);
const params = new URLSearchParams(location.search);

let conversationId = "";
let current = null; // the running stream: see begin()

// sessionStorage: {question, before, resumeFrom, transport, method, path} while a stream runs,
// {question, before, runId, formToken} while the run waits for its form.
const UNFINISHED = "dify-proxy-demo:unfinished";
// Consecutive failed reconnects before giving up: 1 + 2 + 4 + 8 s of waiting, well within the
// proxy's RESUME_GRACE (20 s by default), which is how long it keeps reading for a reconnect.
const MAX_RECONNECTS = 4;
const ANSWERED_ELSEWHERE = "The form had already been answered; the answer shows what came of it.";
// A placeholder in a Human Input node's form_content: where the input of that name goes.
const FORM_FIELD = /\{\{#\$output\.([A-Za-z0-9_]+)#\}\}/;

// An answer the proxy will not resume (204) and an error worth showing: both stop retries.
class Finished extends Error {}
class Fatal extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

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

function keep(saved) {
  try {
    sessionStorage.setItem(UNFINISHED, JSON.stringify(saved));
  } catch {
    // storage full or disabled: the answer just cannot survive a reload
  }
}

function keepUnfinished(run) {
  const { question, before, resumeFrom, transport, method, path } = run;
  keep({ question, before, resumeFrom, transport, method, path });
}

function keepPaused(turn, runId, formToken) {
  keep({ question: turn.question, before: turn.answer.textContent, runId, formToken });
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
// names the stream; what is kept is its opening id, so that a resume replays the whole stream.
// A form's answer is kept only once the form was accepted (until then a reload asks for the
// form again).
function noteId(run, id) {
  if (run.resumeFrom || !id || run.ended || run.stopping) return;
  const dash = id.lastIndexOf("-");
  if (dash <= 0) return;
  run.resumeFrom = `${id.slice(0, dash)}-0`;
  if (run === current && !run.retryForm) keepUnfinished(run);
}

// --- one question ---------------------------------------------------------------------------

function addTurn(message) {
  const item = document.createElement("li");
  item.className = "turn";
  const question = document.createElement("p");
  question.className = "question";
  question.textContent = message;
  const answer = document.createElement("p");
  answer.className = "answer";
  item.append(question, answer);
  $("#transcript").append(item);
  return { item, question: message, answer, form: null };
}

function handle(run, data) {
  if (run.ended) return;
  if (!run.taskId && data.task_id) run.taskId = data.task_id; // Stop needs it
  if (data.workflow_run_id) run.runId = data.workflow_run_id; // a paused run is followed by it
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
      run.answer.textContent = run.before + (data.answer || "");
      break;
    case "message_end":
      finish(run, run.stopping ? "stopped" : "done");
      break;
    case "human_input_required":
      run.form = data.data;
      break;
    case "workflow_paused":
      paused(run, run.form || (data.data?.reasons || []).find((reason) => reason.form_token));
      break;
    case "workflow_finished":
      // A run followed after it ended sends only this: its outputs hold the answer.
      if (run.answer.textContent === run.before && typeof data.data?.outputs?.answer === "string") {
        run.answer.textContent += data.data.outputs.answer;
      }
      if (data.data?.status === "failed") fail(run, data.data.error || "The run failed.");
      else finish(run, run.stopping || data.data?.status === "stopped" ? "stopped" : "done");
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

// `status`: the HTTP status that refused the stream, if one did.
function fail(run, message, status) {
  if (run.ended) return;
  run.ended = true;
  if (run === current) {
    forgetUnfinished();
    setStatus("error", message);
    $("#stop").disabled = true;
    if (run.retryForm) run.retryForm(status); // the form was not taken
  }
}

// The run waits for a person: this stream has ended, and the form is shown under the answer.
function paused(run, form) {
  if (run.ended) return;
  run.ended = true;
  if (run !== current) return;
  $("#stop").disabled = true;
  if (!form || !form.form_token || !run.runId) {
    forgetUnfinished();
    setStatus("error", "The run paused for a form this page cannot show.");
    return;
  }
  showForm(run.turn, form, run.runId);
}

// A 204 on a reconnect or a resume: the proxy has nothing (more) to send. After the whole answer
// that is the normal end; before it, the answer can no longer be resumed (it expired, outgrew
// the record, or was abandoned after the grace).
const NOT_RESUMABLE = "The connection was lost and the answer can no longer be resumed; please ask again.";

function connected(run) {
  run.opened = true;
  run.failures = 0;
  if (run === current && !run.ended && !run.stopping) setStatus("streaming", "streaming…");
  const onOpened = run.onOpened; // once: reconnects open the stream again
  run.onOpened = null;
  if (onOpened) onOpened();
}

// A dropped connection after the stream had opened: the client reconnects with the last id it
// saw, and the proxy sends the rest. Returns false when it is time to give up.
function reconnecting(run) {
  run.failures += 1;
  if (run.failures > MAX_RECONNECTS) return false;
  if (run === current && !run.stopping) setStatus("reconnecting", "reconnecting…");
  return true;
}

// GET `run.path` with `query` as its parameters; `resumeFrom` instead resumes the stream after
// that event id.
function viaPolyfill(run, query, resumeFrom) {
  const url = new URL(`${apiBase()}${run.path}`);
  if (resumeFrom) {
    // The polyfill's own reconnects replace this parameter with the last id they saw.
    url.searchParams.set("lastEventId", resumeFrom);
  } else {
    for (const [name, value] of Object.entries(query || {})) url.searchParams.set(name, value);
  }
  // eslint-disable-next-line no-undef -- the global from eventsource.min.js
  const source = new EventSourcePolyfill(url.href, {
    headers: run.auth.headers,
    withCredentials: run.auth.cookie,
  });
  source.onopen = () => connected(run);
  // The opening ping (`event: ping`, an empty `data:` and `<stream>-0`) names the stream before
  // Dify's first event, so a reload or a cut before it can resume too.
  source.addEventListener("ping", (event) => noteId(run, event.lastEventId));
  source.onmessage = (event) => {
    noteId(run, event.lastEventId);
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

// `run.method` `run.path` with `body` as JSON (POST); `resumeFrom` instead resumes the stream
// after that event id.
function viaFetch(run, body, resumeFrom) {
  const controller = new AbortController();
  const headers = { ...run.auth.headers };
  if (run.method === "POST") headers["Content-Type"] = "application/json";
  // Lower case, the library's own spelling: it overwrites this header with each id it sees.
  // Another spelling would be a second header, and the request would carry both ids.
  if (resumeFrom) headers["last-event-id"] = resumeFrom;
  fetchEventSource(`${apiBase()}${run.path}`, {
    method: run.method,
    headers,
    credentials: run.auth.cookie ? "include" : "same-origin",
    // A resume is no question (and no second answer to a form): the id says it all.
    body: run.method === "POST" ? JSON.stringify(resumeFrom ? {} : body) : undefined,
    signal: controller.signal,
    openWhenHidden: true, // otherwise every tab switch aborts and re-sends the question
    async onopen(response) {
      if (response.status === 204) throw new Finished(); // nothing (more) to resume
      const type = response.headers.get("content-type") || "";
      if (response.ok && type.startsWith("text/event-stream")) return connected(run);
      // 4xx/5xx: the JSON error's message
      throw new Fatal(await errorMessage(response), response.status);
    },
    onmessage(message) {
      noteId(run, message.id); // the opening ping already carries `<stream>-0`
      if (message.event === "ping" || !message.data) return; // a keep-alive
      handle(run, JSON.parse(message.data));
    },
    onclose() {
      // The proxy always ends a stream with message_end, workflow_paused or error (a followed
      // run: workflow_finished): anything else was a cut.
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
        fail(run, error.message, error.status);
      } else if (run.opened) {
        fail(run, "The connection was lost; the answer is incomplete.");
      } else {
        fail(run, `Connection failed: ${error.message}`);
      }
    },
  );
  return () => controller.abort();
}

// Open `run`'s stream with its client: the polyfill sends `request` as query parameters, the
// fetch client as the JSON body.
function open(run, request, resumeFrom) {
  const via = run.transport === "fetch" ? viaFetch : viaPolyfill;
  run.close = via(run, request, resumeFrom);
}

// A new stream into `turn`'s answer (which keeps the text it has): `stream` is its client
// (`transport`), `method` and `path`.
function begin(turn, stream) {
  if (current) current.close(); // e.g. a polyfill still waiting to reconnect
  // A form being answered waits for the answer's fate; one left for a new question stays unused.
  for (const form of [current?.turn.form, turn.form]) if (form) form.disabled = true;
  const run = {
    turn,
    question: turn.question,
    answer: turn.answer,
    before: turn.answer.textContent, // a resume replays the stream after this text
    ...stream,
    auth: session(),
    taskId: null,
    runId: null,
    form: null, // a human_input_required event's data
    resumeFrom: null, // `<stream>-0`, once an event id has named the stream
    retryForm: null, // while a form's answer is not known to be taken
    onOpened: null,
    opened: false,
    failures: 0,
    ended: false,
    stopping: false,
    close: () => {},
  };
  current = run;
  setStatus("streaming", "streaming…");
  $("#stop").disabled = false;
  return run;
}

function send(message) {
  let inputs;
  try {
    inputs = JSON.parse($("#inputs").value || "{}");
  } catch {
    setStatus("error", "Inputs must be a JSON object.");
    return false;
  }
  if ($("#pause").checked) {
    // The stand-in's Human Input node (dify_proxy/standin/human_input.py); real Dify ignores it.
    inputs = { ...inputs, _standin: { ...inputs._standin, human_input: 1 } };
  }
  const transport = choice("transport");
  const method = transport === "fetch" ? "POST" : "GET";
  const run = begin(addTurn(message), { transport, method, path: "/api/chat" });
  keepUnfinished(run); // the question; its stream's id follows with the first event
  const body = { message, inputs };
  if (conversationId) body.conversation_id = conversationId;
  if (transport === "fetch") open(run, body);
  else open(run, { ...body, inputs: JSON.stringify(inputs) });
  return true;
}

// --- a form that a paused run waits for -----------------------------------------------------

// The form under the answer: form_content's text with each `{{#$output.<name>#}}` placeholder
// replaced by that input (inputs it does not place go at the end), and one button per action.
// `form` is a human_input_required event's data, or GET /api/form/human_input/<token>'s answer
// with its token.
function showForm(turn, form, runId) {
  keepPaused(turn, runId, form.form_token);
  setStatus("paused", "paused: answer the form to go on");
  dropForm(turn);
  const element = document.createElement("form");
  element.className = "human-input";
  const fields = document.createElement("fieldset");
  const inputs = new Map((form.inputs || []).map((input) => [input.output_variable_name, input]));
  const defaults = form.resolved_default_values || {};
  const field = (input) => {
    const name = input.output_variable_name;
    const control = document.createElement(input.type === "paragraph" ? "textarea" : "input");
    control.name = name;
    control.setAttribute("aria-label", name);
    control.value = defaults[name] ?? (input.default?.type === "constant" ? input.default.value : "");
    inputs.delete(name);
    return control;
  };
  const parts = (form.form_content || "").split(FORM_FIELD);
  parts.forEach((part, index) => {
    if (index % 2 === 1) {
      if (inputs.has(part)) fields.append(field(inputs.get(part)));
    } else if (part.trim()) {
      const text = document.createElement("p");
      text.textContent = part.trim();
      fields.append(text);
    }
  });
  for (const input of [...inputs.values()]) fields.append(field(input));
  const actions = document.createElement("p");
  actions.className = "actions";
  for (const action of form.actions || form.user_actions || []) {
    const button = document.createElement("button");
    button.type = "submit";
    button.value = action.id;
    button.textContent = action.title || action.id;
    if (action.button_style === "primary") button.className = "primary";
    actions.append(button);
  }
  fields.append(actions);
  element.append(fields);
  element.addEventListener("submit", (event) => {
    event.preventDefault();
    const values = {};
    for (const control of fields.querySelectorAll("[name]")) values[control.name] = control.value;
    answerForm(turn, form.form_token, runId, { action: event.submitter.value, inputs: values });
  });
  fields.dataset.formToken = form.form_token;
  turn.form = fields;
  turn.item.append(element);
}

// `turn.form` is the form's fieldset (it disables every control at once).
function dropForm(turn) {
  if (turn.form) turn.form.parentElement.remove();
  turn.form = null;
}

// Answer the form and read the rest of the run (see the comment at the top for each client).
// The form stays until the proxy has taken the answer; if it refuses it, the form comes back.
function answerForm(turn, formToken, runId, answer) {
  const transport = choice("transport");
  const token = encodeURIComponent(formToken);
  const run = begin(
    turn,
    transport === "fetch"
      ? { transport, method: "POST", path: `/api/form/human_input/${token}` }
      : { transport, method: "GET", path: `/api/workflow/${encodeURIComponent(runId)}/events` },
  );
  run.runId = runId;
  // The proxy's answer to the form can come after the resumed run's events (Dify resumes it in a
  // worker): by then the run may have paused at its next form, which must stay. So the form
  // dropped is this token's, whether the one answered or the same form shown again.
  const taken = () => {
    run.retryForm = null;
    if (turn.form?.dataset.formToken === formToken) dropForm(turn);
    if (run.resumeFrom && run === current && !run.ended) keepUnfinished(run);
  };
  // Refused: answered meanwhile (412, in another tab, say), the run is followed to see what came
  // of it; otherwise (a 400 invalid_form_data, a lost connection) the form can be sent again.
  run.retryForm = (status) => {
    run.retryForm = null;
    if (status === 412) {
      taken();
      hint(ANSWERED_ELSEWHERE);
      followRun(turn, runId);
      return;
    }
    turn.form.disabled = false;
    keepPaused(turn, runId, formToken);
  };
  if (transport === "fetch") {
    run.onOpened = taken; // the proxy answers the form before it opens the stream
    open(run, answer);
    return;
  }
  run.onOpened = async () => {
    try {
      const response = await fetch(`${apiBase()}/api/form/human_input/${token}`, {
        method: "POST",
        headers: { "Content-Type": "application/json", ...run.auth.headers },
        credentials: run.auth.cookie ? "include" : "same-origin",
        body: JSON.stringify(answer),
      });
      if (response.ok || response.status === 412) {
        taken();
        // Answered meanwhile: the stream already open shows what came of it.
        if (!response.ok) hint(ANSWERED_ELSEWHERE);
      } else {
        run.close();
        fail(run, await errorMessage(response), response.status);
      }
    } catch (error) {
      run.close();
      fail(run, error.message);
    }
  };
  open(run, null);
}

// Follow a run whose form was answered: what is left of it, or for a finished run its
// workflow_finished (with the answer in its outputs).
function followRun(turn, runId) {
  const transport = choice("transport");
  const path = `/api/workflow/${encodeURIComponent(runId)}/events`;
  open(begin(turn, { transport, method: "GET", path }), null);
}

// After a reload while paused: the form is fetched again. Answered meanwhile (412), the run is
// followed instead: what is left of it, or for a finished run its workflow_finished.
async function reopenForm(turn, saved) {
  setStatus("paused", "fetching the form…");
  const auth = session();
  const token = encodeURIComponent(saved.formToken);
  let response;
  try {
    response = await fetch(`${apiBase()}/api/form/human_input/${token}`, {
      headers: auth.headers,
      credentials: auth.cookie ? "include" : "same-origin",
    });
  } catch (error) {
    setStatus("error", `Fetching the form failed: ${error.message}`);
    return;
  }
  if (response.ok) {
    showForm(turn, { ...(await response.json()), form_token: saved.formToken }, saved.runId);
    return;
  }
  if (response.status === 412) {
    followRun(turn, saved.runId);
    return;
  }
  forgetUnfinished();
  setStatus("error", `The form can no longer be answered: ${await errorMessage(response)}`);
}

// After a reload: the unfinished stream of this tab, replayed from its first event into the new
// page (the text shown before the reload went with the old page), then followed live, by the
// client and on the route that opened it. The proxy sends it without asking Dify again, and a
// finished stream is replayed whole. A paused run shows its form again.
function resumeUnfinished() {
  const saved = savedUnfinished();
  if (!saved) return;
  const turn = addTurn(saved.question);
  turn.answer.textContent = saved.before || "";
  if (saved.formToken && saved.runId) {
    reopenForm(turn, saved);
    return;
  }
  const known = ["fetch", "polyfill"].includes(saved.transport);
  const transport = known ? saved.transport : choice("transport");
  const method = saved.method || (transport === "fetch" ? "POST" : "GET");
  const run = begin(turn, { transport, method, path: saved.path || "/api/chat" });
  if (!saved.resumeFrom) {
    // Reloaded before the stream said its id (the polyfill learns it with the first event).
    fail(run, "The page was reloaded before the answer began; please ask again.");
    return;
  }
  run.resumeFrom = saved.resumeFrom;
  open(run, null, saved.resumeFrom);
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

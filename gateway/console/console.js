// The recsys web console: calls the gateway's HTTP/JSON API (same origin) with a bearer token.
// `#token=...&scenario=...&user=...` (also item=, category=, n=) prefills the form and runs a
// request on load. The fragment never reaches the server; the token is then removed from the
// address bar and kept only in this page's memory.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { debugAllowed: null, previous: [], scenarios: {} };
const PROFILE_TOP_N = 5; // entries per profile list

function splitIds(text) {
  return text.split(",").map((s) => s.trim()).filter(Boolean);
}

function showStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  const token = $("token").value.trim();
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
    referrerPolicy: "no-referrer",
  });
  let payload = null;
  try {
    payload = await response.json();
  } catch (_error) {
    payload = null;
  }
  if (!response.ok) {
    const error = (payload && payload.error) || { code: `HTTP ${response.status}`, message: response.statusText };
    const failure = new Error(`${error.code}: ${error.message}`);
    failure.code = error.code;
    failure.status = response.status;
    throw failure;
  }
  return payload;
}

async function loadScenarios(wanted) {
  const answer = await api("GET", "/v1/scenarios");
  const select = $("scenario");
  select.replaceChildren();
  for (const scenario of answer.scenarios) {
    state.scenarios[scenario.name] = scenario;
    const option = document.createElement("option");
    option.value = scenario.name;
    option.textContent = scenario.name;
    select.append(option);
  }
  if (wanted && state.scenarios[wanted]) select.value = wanted;
  describeScenario();
}

function describeScenario() {
  const scenario = state.scenarios[$("scenario").value];
  if (!scenario) return;
  const required = scenario.requiredFields.length ? scenario.requiredFields.join(", ") : "nothing beyond the scenario";
  $("scenario-help").textContent =
    `${scenario.name}: requires ${required}; ${scenario.defaultNumItems} items by default; ` +
    `stages ${scenario.stages.join(" → ")}; budget ${scenario.timeoutMs} ms`;
}

function buildRequest(debug) {
  const request = { scenario: $("scenario").value, debug };
  const user = $("user").value.trim();
  if (user) request.userId = user;
  const numItems = $("num-items").value.trim();
  request.numItems = numItems ? Number(numItems) : (state.scenarios[request.scenario] || {}).defaultNumItems || 20;
  const contextItems = splitIds($("context-items").value);
  const category = $("category").value.trim();
  if (contextItems.length || category) request.context = { itemIds: contextItems, category };
  const history = splitIds($("history").value);
  if (history.length) request.history = history.map((itemId) => ({ itemId, type: "VIEW" }));
  return request;
}

async function recommend() {
  const wantDebug = $("debug").checked && state.debugAllowed !== false;
  showStatus("asking the gateway …");
  let response;
  try {
    response = await api("POST", "/v1/recommend", buildRequest(wantDebug));
    if (wantDebug) state.debugAllowed = true;
  } catch (error) {
    if (wantDebug && error.code === "PERMISSION_DENIED" && /debug/.test(error.message)) {
      state.debugAllowed = false; // this token has no debug scope: ask without explanations
      $("debug").checked = false;
      return recommend();
    }
    showStatus(error.message, true);
    return;
  }
  const attributes = await describeItems(response.items.map((item) => item.itemId));
  render(response, attributes);
  const degraded = response.degraded ? " (degraded)" : "";
  showStatus(`${response.items.length} items${degraded}`);
  await loadProfile();
}

// The current user's profile (POST /v1/user-profile): the stored history's (or the typed
// history's) top categories and brands, and the attribute clusters nearest the user embedding.
async function loadProfile() {
  const request = { topN: PROFILE_TOP_N };
  const user = $("user").value.trim();
  if (user) request.userId = user;
  const history = splitIds($("history").value);
  if (history.length) request.history = history.map((itemId) => ({ itemId, type: "VIEW" }));
  const panel = $("profile");
  if (!user && !history.length) {
    panel.hidden = true; // an anonymous request without a history has no profile
    return;
  }
  panel.hidden = false;
  let profile;
  try {
    profile = await api("POST", "/v1/user-profile", request);
  } catch (error) {
    $("profile-status").textContent = `profile unavailable: ${error.message}`;
    return;
  }
  renderProfile(profile);
}

function profileRow(table, label, value, detail, kind) {
  const row = table.tBodies[0].insertRow();
  row.dataset.name = label;
  if (kind) row.dataset.kind = kind;
  row.insertCell().textContent = label;
  const bar = row.insertCell();
  bar.className = "bar";
  const fill = document.createElement("span");
  fill.style.width = `${Math.max(0, Math.min(1, value)) * 100}%`;
  bar.append(fill);
  row.insertCell().textContent = detail;
}

function ago(milliseconds) {
  if (!Number(milliseconds)) return "";
  const days = (Date.now() - Number(milliseconds)) / 86_400_000;
  return days < 1 ? "today" : `${Math.round(days)} d ago`;
}

function renderProfile(profile) {
  const status = [`${profile.historyLength} events`];
  if (profile.unknownItems) status.push(`${profile.unknownItems} unknown items skipped`);
  if (profile.degraded) status.push(`nearest unavailable: ${profile.degradedReasons.join("; ")}`);
  status.push(profile.modelVersion);
  $("profile-status").textContent = status.join(" · ");
  for (const [id, entries] of [["profile-categories", profile.categories], ["profile-brands", profile.brands]]) {
    const table = $(id);
    table.tBodies[0].replaceChildren();
    for (const entry of entries) {
      const seen = ago(entry.lastSeenMs);
      const events = `${entry.events} event${entry.events === 1 ? "" : "s"}`;
      profileRow(table, entry.name, entry.weight, `${fmt(entry.weight)} · ${events}${seen ? ` · ${seen}` : ""}`);
    }
  }
  const nearest = $("profile-nearest");
  nearest.tBodies[0].replaceChildren();
  for (const entry of profile.nearest) {
    profileRow(nearest, `${entry.kind} ${entry.name}`, (entry.similarity + 1) / 2, fmt(entry.similarity), entry.kind);
  }
}

async function describeItems(ids) {
  if (!ids.length) return {};
  try {
    const answer = await api("GET", `/v1/items?ids=${encodeURIComponent(ids.join(","))}`);
    return Object.fromEntries(answer.items.map((item) => [item.itemId, item]));
  } catch (_error) {
    return {}; // category and brand are a nicety; the recommendation itself arrived
  }
}

function cell(className, text) {
  const element = document.createElement("span");
  element.className = className;
  element.textContent = text;
  return element;
}

function fmt(value) {
  return typeof value === "number" ? value.toFixed(3) : String(value ?? "");
}

function render(response, attributes) {
  $("summary").hidden = false;
  $("model-version").textContent = response.modelVersion || "(none)";
  const degraded = $("degraded");
  degraded.textContent = response.degraded ? `yes: ${response.degradedReasons.join("; ")}` : "no";
  degraded.className = response.degraded ? "degraded" : "";
  const timings = $("timings").tBodies[0];
  timings.replaceChildren();
  for (const timing of response.timings) {
    const row = timings.insertRow();
    row.insertCell().textContent = timing.stage;
    row.insertCell().textContent = `${Number(timing.milliseconds).toFixed(2)} ms`;
  }

  const ids = response.items.map((item) => item.itemId);
  const before = new Set(state.previous);
  const list = $("items");
  list.replaceChildren();
  response.items.forEach((item, position) => {
    const known = attributes[item.itemId] || {};
    const entry = document.createElement("li");
    entry.className = "item";
    entry.dataset.itemId = item.itemId;
    if (state.previous.length && !before.has(item.itemId)) entry.classList.add("new");
    entry.append(cell("rank", `#${position + 1}`), cell("id", item.itemId));
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.append(
      cell("category", `category ${known.category || "?"}`),
      cell("brand", `brand ${known.brand || "?"}`),
      cell("source", `source ${item.source}`),
      cell("score", `score ${fmt(item.score)}`),
    );
    if (item.explanation) {
      meta.append(cell("recall-score", `recall ${fmt(item.recallScore)}`));
      meta.append(cell("rank-score", `rank ${fmt(item.rankScore)}`));
    }
    const actions = document.createElement("span");
    actions.className = "actions";
    for (const [label, type] of [["click", "CLICK"], ["add to cart", "ADD_TO_CART"]]) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = label;
      button.dataset.eventType = type;
      button.addEventListener("click", () => sendEvent(item.itemId, type));
      actions.append(button);
    }
    entry.append(meta, actions);
    if (item.explanation) entry.append(cell("explanation", item.explanation));
    list.append(entry);
  });
  if (state.previous.length) {
    const added = ids.filter((id) => !before.has(id)).length;
    const same = ids.length === state.previous.length && ids.every((id, i) => id === state.previous[i]);
    $("change").textContent = same ? "same list as before" : `list changed: ${added} new item(s)`;
  }
  state.previous = ids;
}

function eventId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12)); // also outside secure contexts
  return `console-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

async function sendEvent(itemId, type) {
  const userId = $("user").value.trim();
  if (!userId) {
    showStatus("events need a user id", true);
    return;
  }
  const event = { eventId: eventId(), userId, itemId, type, timestampMs: String(Date.now()), scenario: $("scenario").value };
  try {
    const answer = await api("POST", "/v1/events", { events: [event] });
    const line = document.createElement("li");
    line.textContent = `${type} ${itemId} by ${userId}: accepted ${answer.accepted}, duplicates ${answer.duplicates}`;
    $("events").prepend(line);
  } catch (error) {
    showStatus(error.message, true);
    return;
  }
  await recommend(); // the next recommendation reflects the event
}

async function checkReady() {
  const badge = $("ready");
  try {
    const response = await fetch("/readyz", { cache: "no-store" });
    const answer = await response.json();
    badge.textContent = `gateway ${answer.status}`;
    badge.className = `badge ${response.ok ? "ok" : "bad"}`;
  } catch (_error) {
    badge.textContent = "gateway unreachable";
    badge.className = "badge bad";
  }
}

async function linkMetrics() {
  try {
    const response = await fetch("/console/config.json", { cache: "no-store" });
    const config = await response.json();
    $("metrics-link").href = `${location.protocol}//${location.hostname}:${config.metricsPort}/metrics`;
  } catch (_error) {
    $("metrics-link").hidden = true;
  }
}

function readFragment() {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  const prefill = Object.fromEntries(params.entries());
  if (params.has("token")) {
    params.delete("token"); // keep it out of the address bar, history and screenshots
    const rest = params.toString();
    history.replaceState(null, "", `${location.pathname}${location.search}${rest ? `#${rest}` : ""}`);
  }
  return prefill;
}

async function start() {
  const prefill = readFragment();
  if (prefill.token) $("token").value = prefill.token;
  if (prefill.user) $("user").value = prefill.user;
  if (prefill.item) $("context-items").value = prefill.item;
  if (prefill.category) $("category").value = prefill.category;
  if (prefill.n) $("num-items").value = prefill.n;
  $("scenario").addEventListener("change", describeScenario);
  $("token").addEventListener("change", () => {
    state.debugAllowed = null;
    loadScenarios($("scenario").value).catch((error) => showStatus(error.message, true));
  });
  $("request-form").addEventListener("submit", (event) => {
    event.preventDefault();
    recommend();
  });
  checkReady();
  linkMetrics();
  if (!$("token").value) {
    showStatus("enter a token (make run writes one to artifacts/dev-token)");
    return;
  }
  try {
    await loadScenarios(prefill.scenario);
  } catch (error) {
    showStatus(error.message, true);
    return;
  }
  if (prefill.scenario) await recommend();
}

document.addEventListener("DOMContentLoaded", start);

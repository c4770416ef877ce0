// The review page: fetches the queue a page at a time, shows one item, posts one decision per click or key.
"use strict";

const PAGE = 20;        // items fetched per request
const REFILL_BELOW = 5; // fetch the next page when fewer items than this are buffered

const $ = (id) => document.getElementById(id);
const state = { task: $("task").value, after: -1, buffer: [], current: null, remaining: 0, loading: null, done: false };

async function getJSON(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function query(extra) {
  const params = new URLSearchParams({ task: state.task, label: $("filter-label").value, run: $("filter-run").value, ...extra });
  return params.toString();
}

async function loadFacets() {
  const facets = await getJSON(`/api/facets?task=${encodeURIComponent(state.task)}`);
  fillSelect($("filter-label"), facets.labels);
  fillSelect($("filter-run"), facets.runs);
  $("vocab").replaceChildren(...facets.vocab.map((label) => new Option(label, label)));
  state.vocab = facets.vocab;
}

function fillSelect(select, counts) {
  const chosen = select.value;
  select.replaceChildren(new Option("any", ""), ...Object.entries(counts).map(([v, n]) => new Option(`${v} (${n})`, v)));
  select.value = chosen in counts ? chosen : "";
}

function refill() {
  if (state.loading || state.done) return state.loading;
  state.loading = getJSON(`/api/queue?${query({ after: state.after, limit: PAGE })}`).then((page) => {
    state.buffer.push(...page.items);
    state.remaining = page.remaining;  // undecided items under these filters, skipped ones included
    if (page.items.length) state.after = page.items[page.items.length - 1].position;
    else state.done = true;
    for (const item of page.items.slice(0, 2)) new Image().src = imageURL(item.uri);  // the next ones load ahead
  }).finally(() => { state.loading = null; });
  return state.loading;
}

function imageURL(uri, size) {
  return `/image?uri=${encodeURIComponent(uri)}${size ? `&size=${size}` : ""}`;
}

async function next() {
  if (state.buffer.length < REFILL_BELOW) {
    const loading = refill();
    if (!state.buffer.length && loading) await loading;
  }
  state.current = state.buffer.shift() || null;
  show(state.current);
}

function show(item) {
  $("item").hidden = !item;
  $("empty").hidden = !!item;
  $("remaining").textContent = `${state.remaining} undecided`;
  if (!item) return;
  $("item").dataset.uri = item.uri;
  $("image").src = imageURL(item.uri);
  $("uri").textContent = item.uri;
  $("predicted").textContent = item.label;
  $("score").textContent = item.score.toFixed(3);
  $("topk").replaceChildren(...item.topk.map((choice, i) => {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.label = choice.label;
    button.innerHTML = `<kbd>${i + 1}</kbd> <span class="label"></span> <span class="score">${choice.score.toFixed(3)}</span>`;
    button.querySelector(".label").textContent = choice.label;
    button.addEventListener("click", () => decide(choice.label));
    return button;
  }));
  $("other-label").value = "";
  $("status").textContent = "";
  if ($("similar")) showSimilar(item.uri);
}

async function showSimilar(uri) {
  const { neighbours } = await getJSON(`/api/similar?uri=${encodeURIComponent(uri)}&task=${encodeURIComponent(state.task)}`);
  if (!state.current || state.current.uri !== uri) return;
  $("similar").replaceChildren(...neighbours.map((n) => {
    const li = document.createElement("li");
    li.className = "neighbour";
    li.title = `${n.uri} (similarity ${n.similarity})`;
    const img = new Image();
    img.src = imageURL(n.uri, "thumb");
    img.alt = n.label || "";
    li.append(img, document.createTextNode(n.label || "?"));
    return li;
  }));
}

async function decide(label) {
  const item = state.current;
  if (!item || state.posting) return;
  state.posting = true;
  try {
    await getJSON("/api/decide", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ uri: item.uri, task: state.task, label, reviewer: $("reviewer").value }),
    });
    state.remaining -= 1;
    await next();
  } catch (error) {
    $("status").textContent = `not saved: ${error.message}`;
  } finally {
    state.posting = false;
  }
}

function skip() {
  if (state.current) next();  // it stays in the queue for the next visit
}

async function restart() {
  Object.assign(state, { task: $("task").value, after: -1, buffer: [], current: null, done: false });
  await loadFacets();
  await next();
}

$("other").addEventListener("submit", (event) => {
  event.preventDefault();
  const typed = $("other-label").value.trim().toLowerCase();
  const label = state.vocab.find((v) => v.toLowerCase() === typed) || state.vocab.find((v) => v.toLowerCase().startsWith(typed));
  if (typed && label) decide(label);
  else $("status").textContent = `no label "${$("other-label").value}" in the vocabulary`;
});
$("skip").addEventListener("click", skip);
for (const id of ["task", "filter-label", "filter-run"]) $(id).addEventListener("change", restart);
$("reviewer").value = localStorage.getItem("artfuse-reviewer") || $("reviewer").value;
$("reviewer").addEventListener("change", () => localStorage.setItem("artfuse-reviewer", $("reviewer").value));
$("image").addEventListener("load", () => {
  if (!window.firstImageAt) window.firstImageAt = performance.now();  // time to first image, for measurements
});

document.addEventListener("keydown", (event) => {
  if (event.target.closest("input, select, textarea") || event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.key === "/") { event.preventDefault(); $("other-label").focus(); return; }
  if (event.key === "s") { skip(); return; }
  const n = Number(event.key);
  if (n >= 1 && state.current && n <= state.current.topk.length) decide(state.current.topk[n - 1].label);
});

restart().catch((error) => { $("status").textContent = error.message; $("item").hidden = false; });

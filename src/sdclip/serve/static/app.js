// The prompt inspector: /v1/tokenize for the token view, /v1/compare for the heatmap.  No framework, no build.
"use strict";
const $ = (id) => document.getElementById(id);
const tokenBox = $("token");
tokenBox.value = sessionStorage.getItem("sdclip-token") || "";

async function api(path, body) {
  const headers = { "Content-Type": "application/json" };
  if (tokenBox.value) headers.Authorization = "Bearer " + tokenBox.value;
  const response = await fetch(path, body === undefined ? { headers } : { method: "POST", headers, body: JSON.stringify(body) });
  const data = await response.json();
  if (!response.ok) throw new Error((data.error && data.error.message) || response.statusText);
  return data;
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

// weight 1 is grey; above 1 towards orange, below 1 towards blue, saturating at 2x / 0.5x
function weightColour(w) {
  if (w === 1) return "";
  const t = Math.min(1, Math.abs(Math.log2(w)));
  const [r, g, b] = w > 1 ? [243, 163, 107] : [156, 195, 240];
  const mix = (c) => Math.round(236 + (c - 236) * t);
  return `rgb(${mix(r)},${mix(g)},${mix(b)})`;
}

function renderLeaf(leaf, into) {
  const chunks = leaf.chunks;
  chunks.forEach((chunk, k) => {
    const box = el("div", "chunk");
    box.dataset.index = k;
    box.appendChild(el("div", "chunk-head", `chunk ${k + 1}/${chunks.length}: ${chunk.used} of 75 tokens`));
    for (const t of chunk.tokens) {
      const special = t.segment < 0;
      const span = el("span", special ? "tok special" : "tok", t.text);
      span.dataset.id = t.id;
      span.dataset.weight = t.weight;
      span.dataset.position = t.position;
      span.title = `id ${t.id} · weight ${t.weight}` + (special ? "" : ` · segment ${t.segment}`);
      if (!special) span.style.background = weightColour(t.weight);
      box.appendChild(span);
    }
    into.appendChild(box);
  });
  if (leaf.truncated_tokens) {
    const cut = el("div", "truncated", `truncated, ${leaf.truncated_tokens} tokens lost: `);
    cut.appendChild(el("s", "", leaf.truncated));
    into.appendChild(cut);
  }
  for (const w of leaf.warnings) into.appendChild(el("div", "warning", "warning: " + w));
  into.appendChild(el("div", "part-head", `token count: ${leaf.token_count}`));
}

function renderNode(node, into) {
  if (node.schedule) {
    let start = 0;
    for (const entry of node.schedule) {
      const box = el("div", "entry");
      const last = Math.min(entry.until_step, node.steps - 1);
      box.appendChild(el("div", "entry-head", `sampler steps ${start}–${last}`));
      renderNode(entry.prompt, box);
      into.appendChild(box);
      start = entry.until_step + 1;
    }
  } else if (node.and || node.blend) {
    const parts = node.and || node.blend;
    parts.forEach((part, i) => {
      const box = el("div", "entry");
      box.appendChild(el("div", "entry-head", `${node.and ? "AND part" : "blend part"} ${i + 1}, weight ${node.weights[i]}`));
      renderNode(part, box);
      into.appendChild(box);
    });
  } else {
    renderLeaf(node, into);
  }
}

function leaves(node) {
  if (node.schedule) return node.schedule.flatMap((e) => leaves(e.prompt));
  if (node.and || node.blend) return (node.and || node.blend).flatMap(leaves);
  return [node];
}

let pending = 0;
async function inspect() {
  const ticket = ++pending;
  const body = { prompt: $("prompt").value, dialect: $("dialect").value, model: $("model").value || null };
  if (body.dialect === "a1111") body.steps = Number($("steps").value) || 20;
  try {
    const data = await api("/v1/tokenize", body);
    if (ticket !== pending) return;
    $("error").textContent = "";
    const result = $("result");
    result.replaceChildren();
    renderNode(data.chunks, result);
    const all = leaves(data.chunks);
    const chunkCount = all.reduce((n, leaf) => n + leaf.chunks.length, 0);
    const tokenCount = all.reduce((n, leaf) => n + leaf.token_count, 0);
    $("summary").textContent = `${chunkCount} chunk${chunkCount === 1 ? "" : "s"} · ${tokenCount} tokens · ${data.dialect}`;
    $("summary").dataset.chunks = chunkCount;
    document.body.dataset.state = "ready";
  } catch (e) {
    if (ticket !== pending) return;
    $("error").textContent = e.message;
    document.body.dataset.state = "error";
  }
}

function heatColour(c) {  // 1 green, 0 white, -1 red
  const t = Math.max(-1, Math.min(1, c));
  const [r, g, b] = t >= 0 ? [64, 160, 96] : [210, 70, 70];
  const a = Math.abs(t);
  const mix = (x) => Math.round(255 + (x - 255) * a);
  return `rgb(${mix(r)},${mix(g)},${mix(b)})`;
}

async function compare() {
  try {
    const data = await api("/v1/compare", { a: $("cmp-a").value, b: $("cmp-b").value, model: $("model").value || null });
    const table = el("table", "heat");
    const head = el("tr");
    head.appendChild(el("th", "", "layer"));
    for (let p = 0; p < data.positions; p++) {
      const [a, b] = data.tokens.map((t) => (p < t.length ? t[p] : "·"));
      head.appendChild(el("th", "", a === b ? a : `${a}\n${b}`));
    }
    table.appendChild(head);
    data.layers.forEach((layer, i) => {
      const row = el("tr");
      row.appendChild(el("th", "", String(layer)));
      for (const c of data.cosine[i]) {
        const cell = el("td", "", c.toFixed(2));
        cell.style.background = heatColour(c);
        cell.dataset.cosine = c;
        row.appendChild(cell);
      }
      table.appendChild(row);
    });
    $("heatmap").replaceChildren(table);
    $("error").textContent = "";
  } catch (e) {
    $("error").textContent = e.message;
  }
}

let timer = null;
const later = () => { clearTimeout(timer); timer = setTimeout(inspect, 150); };
$("prompt").addEventListener("input", later);
$("dialect").addEventListener("change", inspect);
$("steps").addEventListener("input", later);
$("model").addEventListener("change", inspect);
$("cmp-go").addEventListener("click", compare);
tokenBox.addEventListener("change", () => { sessionStorage.setItem("sdclip-token", tokenBox.value); start(); });

async function start() {
  try {
    const models = await api("/v1/models");
    $("model").replaceChildren(...models.data.map((m) => el("option", "", m.id)));
    $("model").value = models.default;
  } catch (e) {
    $("error").textContent = e.message;
    return;
  }
  await inspect();
}
start();

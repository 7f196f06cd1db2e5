"use strict";
// The explorer page: every number shown comes from the JSON API (dml_ray/serve/app.py).
const TOKEN = new URLSearchParams(location.search).get("token");
const api = (path) => path + (TOKEN ? (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN) : "");
const q = (s) => document.querySelector(s);
const state = {info: null, query: null, hits: []};
window.explorerState = state;

async function getJSON(path, options) {
  const r = await fetch(api(path), options);
  const body = await r.json();
  if (!r.ok) throw new Error(body.detail || r.status);
  return body;
}
const imageUrl = (id) => api("api/image/" + id.split("/").map(encodeURIComponent).join("/"));

// the one display rule of painted maps (dml_ray/report/overlays.py to_pixels): ReLU, divide by the maximum;
// a map without positive values shows nothing. Drawn at grid resolution, the browser upsamples.
function drawMap(canvas, map) {
  const h = map.length, w = map[0].length;
  canvas.width = w; canvas.height = h;
  const ctx = canvas.getContext("2d"), img = ctx.createImageData(w, h);
  const flat = map.flat().map((v) => Math.max(v, 0)), peak = Math.max(0, ...flat);
  flat.forEach((v, i) => {
    const t = peak > 0 ? v / peak : 0;
    img.data[4 * i] = Math.round(255 * t);
    img.data[4 * i + 1] = Math.round(255 * (1 - Math.abs(2 * t - 1)));
    img.data[4 * i + 2] = Math.round(255 * (1 - t));
    img.data[4 * i + 3] = 255;
  });
  ctx.putImageData(img, 0, 0);
}

async function loadGallery() {
  const p = new URLSearchParams();
  if (q("#split").value) p.set("split", q("#split").value);
  if (q("#label").value) p.set("label", q("#label").value);
  const rows = await getJSON("api/gallery?" + p.toString());
  q("#gallery").innerHTML = "";
  for (const row of rows) {
    const img = document.createElement("img");
    img.src = imageUrl(row.image_id); img.title = `${row.image_id} (label ${row.label})`;
    img.dataset.id = row.image_id; img.className = "gallery-item";
    img.onclick = () => openQuery(row.image_id);
    q("#gallery").appendChild(img);
  }
}

function drawQuery(id) {
  const canvas = q("#query"), ctx = canvas.getContext("2d"), img = new Image();
  img.onload = () => ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  img.src = imageUrl(id);
}

async function showHits(hits, mode) {
  state.hits = hits; q("#mode").textContent = mode;
  const box = q("#topk"); box.innerHTML = "";
  for (const hit of hits) {
    const div = document.createElement("div"); div.className = "hit"; div.dataset.id = hit.image_id;
    const img = document.createElement("img"); img.src = imageUrl(hit.image_id);
    img.className = hit.match === null ? "" : (hit.match ? "match" : "miss");
    img.onclick = () => openQuery(hit.image_id);
    div.appendChild(img);
    div.appendChild(document.createElement("br"));
    div.appendChild(document.createTextNode(`${hit.image_id} ${hit.score.toFixed(3)}`));
    box.appendChild(div);
  }
}

async function openQuery(id) {
  state.query = id; state.mapsShown = false; drawQuery(id);
  await showHits(await getJSON(`api/topk?id=${encodeURIComponent(id)}&k=10`), "nearest");
  for (const div of q("#topk").children) {
    const maps = await getJSON(`api/maps?query=${encodeURIComponent(id)}&ref=${encodeURIComponent(div.dataset.id)}`);
    for (const method of state.info.methods) {
      const c = document.createElement("canvas"); c.className = "map"; c.dataset.method = method;
      c.title = method; drawMap(c, maps.maps[method]); div.appendChild(c);
    }
  }
  state.mapsShown = true;
}

function framePixel(ev) {  // (row, col) in the model-input frame
  const r = q("#query").getBoundingClientRect(), [h, w] = state.info.image_size;
  return [(ev.clientY - r.top) * h / r.height, (ev.clientX - r.left) * w / r.width];
}

let dragStart = null;
q("#query").addEventListener("mousedown", (ev) => { dragStart = framePixel(ev); });
q("#query").addEventListener("mouseup", async (ev) => {
  if (!state.query || !dragStart) return;
  const [r0, c0] = dragStart, [r1, c1] = framePixel(ev); dragStart = null;
  const id = encodeURIComponent(state.query);
  if (Math.abs(r1 - r0) < 2 && Math.abs(c1 - c0) < 2) {  // a click: point-specific map on every hit
    state.point = [r0, c0];
    for (const div of q("#topk").children) {
      const res = await getJSON(`api/point?query=${id}&ref=${encodeURIComponent(div.dataset.id)}&row=${r0}&col=${c0}`);
      let c = div.querySelector("canvas.point");
      if (!c) { c = document.createElement("canvas"); c.className = "map point"; div.appendChild(c); }
      c.dataset.values = JSON.stringify(res.map); drawMap(c, res.map);
    }
    state.pointsShown = (state.pointsShown || 0) + 1;
    return;
  }
  const x = Math.min(c0, c1), y = Math.min(r0, r1), w = Math.abs(c1 - c0), h = Math.abs(r1 - r0);
  state.box = [x, y, w, h];
  await showHits(await getJSON(`api/region?query=${id}&x=${x}&y=${y}&w=${w}&h=${h}&k=10`), "region re-ranked");
});

q("#upload").addEventListener("change", async () => {
  const file = q("#upload").files[0]; if (!file) return;
  const res = await getJSON("api/upload?k=10", {method: "POST", body: file});
  state.query = null; await showHits(res.topk, "upload");
  for (const div of q("#topk").children) {  // the upload's maps against its first hits (one forward, server side)
    const maps = res.maps[div.dataset.id]; if (!maps) continue;
    for (const method of state.info.methods) {
      const c = document.createElement("canvas"); c.className = "map"; c.title = method;
      drawMap(c, maps[method]); div.appendChild(c);
    }
  }
});
q("#filter").onclick = loadGallery;

async function drawProjection() {
  const method = q("#projmethod").value || "pca";
  const pts = (await getJSON("api/projection?method=" + method)).points, c = q("#projection"), ctx = c.getContext("2d");
  ctx.clearRect(0, 0, c.width, c.height);
  const xs = pts.map((p) => p.x), ys = pts.map((p) => p.y);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const px = (p) => [10 + (p.x - x0) / (x1 - x0 || 1) * (c.width - 20), 10 + (p.y - y0) / (y1 - y0 || 1) * (c.height - 20)];
  for (const p of pts) {
    const [u, v] = px(p); ctx.fillStyle = `hsl(${(p.label * 67) % 360},70%,45%)`;
    ctx.beginPath(); ctx.arc(u, v, 3, 0, 2 * Math.PI); ctx.fill();
  }
  c.onclick = (ev) => {
    const r = c.getBoundingClientRect(), u = ev.clientX - r.left, v = ev.clientY - r.top;
    const best = pts.reduce((a, p) => { const [pu, pv] = px(p); const d = (pu - u) ** 2 + (pv - v) ** 2;
      return d < a[0] ? [d, p] : a; }, [Infinity, null])[1];
    if (best) openQuery(best.image_id);
  };
}

// localization view: the run's localization rows (predicted box, IoU, correct) and the ground-truth box they were
// scored against, on the image in the model-input frame; boxes are (x0, y0, x1, y1) in that frame's pixels
const viewUrl = (id) => api("api/view/" + id.split("/").map(encodeURIComponent).join("/"));

function drawBoxes(canvas, id, row, frame) {
  const [h, w] = frame, ctx = canvas.getContext("2d"), img = new Image();
  canvas.width = 4 * w; canvas.height = 4 * h;
  const rect = (b, colour) => { ctx.strokeStyle = colour; ctx.lineWidth = 3;
    ctx.strokeRect(4 * b[0], 4 * b[1], 4 * (b[2] - b[0]), 4 * (b[3] - b[1])); };
  img.onload = () => {
    ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
    if (row.gt) rect(row.gt, "#2a2");
    rect(row.box, "#d22");
    canvas.dataset.drawn = "1";
  };
  img.src = viewUrl(id);
}

async function showLocalization(threshold) {
  const [method, kind] = q("#locmethod").value.split("|");
  const p = new URLSearchParams({method: method, reference_kind: kind, order: q("#locorder").value, limit: "24"});
  if (threshold !== undefined && threshold !== null) p.set("threshold", threshold);
  state.locShown = false;
  const ticket = state.locTicket = (state.locTicket || 0) + 1;
  const res = await getJSON("api/localization?" + p.toString());
  if (ticket !== state.locTicket) return;  // a later choice is on its way
  const sel = q("#locthreshold"); sel.innerHTML = "";
  for (const t of res.thresholds) {
    const o = document.createElement("option"); o.value = String(t); o.textContent = t.toFixed(3);
    if (t === res.threshold) o.selected = true;
    sel.appendChild(o);
  }
  q("#locinfo").textContent = `${res.total} images`;
  const box = q("#localization"); box.innerHTML = "";
  for (const row of res.rows) {
    const div = document.createElement("div"); div.className = "loc"; div.dataset.id = row.image_id;
    div.dataset.box = JSON.stringify(row.box); div.dataset.gt = JSON.stringify(row.gt);
    div.dataset.iou = String(row.iou);
    const c = document.createElement("canvas"); drawBoxes(c, row.image_id, row, res.frame); div.appendChild(c);
    div.appendChild(document.createElement("br"));
    div.appendChild(document.createTextNode(`IoU ${row.iou.toFixed(3)} ${row.correct ? "correct" : "wrong"}`));
    div.title = row.image_id; box.appendChild(div);
  }
  state.loc = res; state.locShown = true;
}

async function setupLocalization() {
  const res = await getJSON("api/localization/options");
  if (!res.available) { q("#locbar").textContent = "this run has no localization table (stage localize)"; return; }
  for (const o of res.options) {
    const opt = document.createElement("option"); opt.value = `${o.method}|${o.reference_kind}`;
    opt.textContent = `${o.reference_kind}/${o.method}`; q("#locmethod").appendChild(opt);
  }
  q("#locmethod").onchange = () => showLocalization(null);  // the method's best threshold (metrics), else the middle
  q("#locthreshold").onchange = () => showLocalization(q("#locthreshold").value);
  q("#locorder").onchange = () => showLocalization(q("#locthreshold").value);
  showLocalization(null);  // not awaited: a large table's first read must not hold up the page
}

(async () => {
  state.info = await getJSON("api/info");
  q("#runid").textContent = "run " + state.info.run_id;
  for (const s of state.info.splits) { const o = document.createElement("option"); o.textContent = s; q("#split").appendChild(o); }
  q("#projmethod").innerHTML = state.info.projections.map((m) => `<option value="${m}">${m.toUpperCase()}</option>`).join("");
  q("#projmethod").onchange = drawProjection;
  await loadGallery(); await drawProjection(); await setupLocalization();
  document.body.dataset.ready = "1";
})();

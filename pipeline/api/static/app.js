// framegrid's page: live tiles per stream, devices, add/pause/remove. Plain JS, no build step.
// It uses the HTTP API only; the token (when the server has one) is kept in a same-site cookie,
// so the pictures, the live view and the event stream carry it too.
//
// Tiles show each stream's newest picture with its boxes, fetched again as soon as the last one
// arrived and at most every TILE_MS: every request is short, so 32 (or 100) tiles share the six
// connections a browser opens to one server over HTTP/1.1. One MJPEG stream per tile would hold
// one connection each and stall the page from the sixth camera on. A click on a tile opens the
// live view (MJPEG) of that one camera.
"use strict";

const $ = (sel) => document.querySelector(sel);
const TILE_MS = 1000;  // a tile's picture is at most this old (plus one request)
let events = null;

async function api(path, options = {}) {
  const res = await fetch(path, { credentials: "same-origin", ...options });
  if (res.status === 401) { showLogin(); throw new Error("unauthorized"); }
  return res;
}

function showLogin(message) {
  if (events) { events.close(); events = null; }
  $("#app").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message || "";
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v); else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function fmtBytes(n) { return n ? (n / 2 ** 30).toFixed(1) + " GiB" : "-"; }
function fmtMs(v) { return v == null ? "-" : v.toFixed(0) + " ms"; }

async function errorText(res) {
  try {
    const body = await res.json();
    if (Array.isArray(body.detail)) return body.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
    return body.detail || res.statusText;
  } catch { return res.statusText; }
}

function tile(stream) {
  let t = document.getElementById("tile-" + stream.name);
  if (!t) {
    const img = el("img", { alt: stream.name, class: "view", title: "live view", onclick: () => openLive(stream.name) });
    img.addEventListener("load", () => { img.dataset.loads = String(Number(img.dataset.loads || 0) + 1); schedule(img); });
    img.addEventListener("error", () => schedule(img));
    const pause = el("button", { class: "pause", onclick: () => setEnabled(stream.name, !t.dataset.enabled || t.dataset.enabled === "false") }, "pause");
    const remove = el("button", { class: "remove", onclick: () => removeStream(stream.name) }, "remove");
    t = el("div", { id: "tile-" + stream.name, class: "tile", "data-stream": stream.name }, img,
      el("div", { class: "meta" }, el("span", { class: "name" }, stream.name), el("span", { class: "state pill" }),
        el("span", { class: "fps" }), el("span", { class: "latency" }), el("span", { class: "objects" }), pause, remove,
        el("span", { class: "error" })));
    $("#tiles").append(t);
  }
  const img = t.querySelector("img");
  img.dataset.live = String(stream.enabled);
  if (stream.enabled && !img.dataset.base) {
    img.dataset.base = "/api/streams/" + encodeURIComponent(stream.name) + "/snapshot.jpg?boxes=1";
    refresh(img);
  }
  if (!stream.enabled) delete img.dataset.base;
  t.dataset.enabled = String(stream.enabled);
  t.dataset.state = stream.state;
  t.dataset.published = String(stream.published);
  const state = t.querySelector(".state");
  state.textContent = stream.state;
  state.className = "state pill state-" + stream.state;
  t.querySelector(".fps").textContent = `${stream.fps_in.toFixed(1)} → ${stream.fps_out.toFixed(1)} fps`;
  t.querySelector(".latency").textContent = "p50 " + fmtMs(stream.latency_ms.p50);
  const objects = stream.objects || {};
  const total = Object.values(objects).reduce((a, b) => a + b, 0);
  t.dataset.objects = String(total);
  t.querySelector(".objects").textContent = total ? Object.entries(objects).map(([k, v]) => `${v} ${k}`).join(", ") : "no objects";
  t.querySelector(".pause").textContent = stream.enabled ? "pause" : "resume";
  t.querySelector(".error").textContent = stream.error || "";
}

function refresh(img) {
  if (!img.dataset.base || !img.isConnected) return;
  img.dataset.asked = String(performance.now());
  img.src = img.dataset.base + "&t=" + Date.now();  // a new URL: never a cached picture
}

function schedule(img) {
  if (img.dataset.pending) return;
  img.dataset.pending = "1";
  const waited = performance.now() - Number(img.dataset.asked || 0);
  setTimeout(() => { delete img.dataset.pending; refresh(img); }, Math.max(0, TILE_MS - waited));
}

function openLive(name) {
  const box = $("#live");
  box.querySelector(".title").textContent = name;
  box.querySelector("img").src = "/api/streams/" + encodeURIComponent(name) + "/mjpeg?boxes=1";
  box.dataset.stream = name;
  box.hidden = false;
}

function closeLive() {
  const box = $("#live");
  box.querySelector("img").removeAttribute("src");  // ends the MJPEG connection
  delete box.dataset.stream;
  box.hidden = true;
}

function render(data) {
  const names = new Set(data.streams.map((s) => s.name));
  for (const t of document.querySelectorAll(".tile")) if (!names.has(t.dataset.stream)) t.remove();
  for (const s of data.streams) tile(s);
  const mqtt = $("#mqtt");
  mqtt.textContent = data.mqtt.connected ? "mqtt connected" : `mqtt disconnected (${data.mqtt.buffered} buffered)`;
  mqtt.className = "pill " + (data.mqtt.connected ? "ok" : "bad");
  const body = $("#devices tbody");
  body.replaceChildren(...data.devices.map((d) => el("tr", { "data-device": d.id },
    el("td", {}, d.id + (d.drained ? " (drained)" : "")), el("td", {}, d.name),
    el("td", {}, `${fmtBytes(d.memory_used_bytes)} / ${fmtBytes(d.memory_total_bytes)}`),
    el("td", {}, d.utilization_percent == null ? "-" : d.utilization_percent.toFixed(0) + " %"),
    el("td", {}, ...d.slots.map((s) => el("div", { class: "slot" },
      `${s.name} (${s.model}) ${s.state}: ${s.streams.join(", ") || "idle"}` +
      (s.service_ms_per_frame == null ? "" : `, ${s.service_ms_per_frame.toFixed(1)} ms/frame`)))))));
  $("#status").textContent = "updated " + new Date().toLocaleTimeString();
}

async function refreshEvents() {
  let res;
  try { res = await api("/api/events?limit=20"); } catch { return; }
  if (!res.ok) return;
  const list = await res.json();
  const box = $("#events");
  const seen = new Set(list.map((e) => e.id));
  for (const card of box.querySelectorAll(".event")) if (!seen.has(card.dataset.event)) card.remove();
  list.forEach((e, i) => {
    let card = box.querySelector(`.event[data-event="${CSS.escape(e.id)}"]`);
    if (!card) {
      card = el("div", { class: "event", "data-event": e.id });
      if (e.has_snapshot) card.append(el("img", { alt: e.label, src: "/api/events/" + encodeURIComponent(e.id) + "/snapshot.jpg?crop=1" }));
      card.append(el("div", { class: "meta" }));
    }
    const when = new Date(e.start_time * 1000).toLocaleTimeString();
    card.querySelector(".meta").replaceChildren(
      el("div", {}, `${e.label} ${e.best_score.toFixed(2)}`),
      el("div", {}, `${e.stream} ${when}`),
      el("div", { class: e.end_time ? "" : "live" }, e.end_time ? (e.zones.join(", ") || "no zone") : "in view"));
    if (e.clip && !card.querySelector(".clip")) {
      // the clip replaces the snapshot when asked for: the browser fetches ranges of it as it plays
      const play = el("button", { class: "clip", type: "button", title: "play the event's clip" },
        `▶ clip ${(e.clip.end - e.clip.start).toFixed(0)} s`);
      play.addEventListener("click", () => {
        const video = el("video", { controls: "", autoplay: "", muted: "", playsinline: "",
          src: "/api/events/" + encodeURIComponent(e.id) + "/clip.mp4" });
        video.muted = true;
        card.querySelector("img, video")?.remove();
        card.prepend(video);
      });
      card.querySelector(".meta").after(play);
    }
    if (box.children[i] !== card) box.insertBefore(card, box.children[i] || null);
  });
}

async function setEnabled(name, enabled) {
  const res = await api("/api/streams/" + encodeURIComponent(name), {
    method: "PATCH", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ enabled }) });
  if (!res.ok) alertError(name, await errorText(res));
}

async function removeStream(name) {
  const res = await api("/api/streams/" + encodeURIComponent(name), { method: "DELETE" });
  if (!res.ok) alertError(name, await errorText(res));
  else document.getElementById("tile-" + name)?.remove();
}

function alertError(name, text) {
  const t = document.getElementById("tile-" + name);
  if (t) t.querySelector(".error").textContent = text;
}

async function addStream(ev) {
  ev.preventDefault();
  const form = new FormData(ev.target);
  const body = { name: form.get("name"), url: form.get("url"), model: form.get("model") };
  if (form.get("max_fps")) body.max_fps = Number(form.get("max_fps"));
  const res = await api("/api/streams", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  if (res.ok) { $("#add-error").textContent = ""; ev.target.reset(); tile(await res.json()); }
  else $("#add-error").textContent = await errorText(res);
}

async function start() {
  let res;
  try { res = await api("/api/streams"); } catch { return; }
  if (res.status === 503) { $("#status").textContent = "starting…"; setTimeout(start, 1000); return; }
  $("#login").hidden = true;
  $("#app").hidden = false;
  const models = await (await api("/api/models")).json();
  $("#models").replaceChildren(...models.map((m) => el("option", { value: m.name }, m.name)));
  render({ streams: await res.json(), devices: [], mqtt: { connected: false, buffered: 0 } });
  events = new EventSource("/api/live");
  events.onmessage = (m) => render(JSON.parse(m.data));
  refreshEvents();
  setInterval(refreshEvents, 3000);
  events.onerror = () => { $("#status").textContent = "reconnecting…"; };
}

$("#login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  document.cookie = "framegrid_token=" + encodeURIComponent($("#token").value) + "; path=/; SameSite=Strict";
  const res = await fetch("/api/streams", { credentials: "same-origin" });
  if (res.status === 401) { showLogin("wrong token"); return; }
  start();
});
$("#add-form").addEventListener("submit", addStream);
$("#live-close").addEventListener("click", closeLive);
document.addEventListener("keydown", (ev) => { if (ev.key === "Escape") closeLive(); });
start();

// Helpers shared by the dashboard's pages: the JSON API over fetch(), DOM building, polling.
"use strict";

const UI = (() => {
  const csrfHeader = document.body.dataset.uiHeader || "X-Conveyor-UI";
  const FINAL = new Set(["succeeded", "failed", "cancelled", "timed_out"]);

  function pageData() {
    const node = document.getElementById("page-data");
    return node ? JSON.parse(node.textContent) : {};
  }

  function toLogin() {
    const here = location.pathname + location.search;
    location.assign("/ui/login?next=" + encodeURIComponent(here));
  }

  // The login cookie authenticates these calls; state-changing ones carry the header
  // the API requires of cookie-authenticated writes (a cross-site form cannot send it).
  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (method !== "GET" && method !== "HEAD") headers[csrfHeader] = "1";
    const init = { method, headers, credentials: "same-origin", redirect: "follow" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    if (response.status === 401 || (response.redirected && new URL(response.url).pathname === "/ui/login")) {
      toLogin();
      throw new Error("logged out");
    }
    let payload = null;
    try {
      payload = await response.json();
    } catch (error) {
      payload = null;
    }
    return { status: response.status, ok: response.ok, body: payload };
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function when(iso) {
    if (!iso) return el("span", { class: "muted", text: "–" });
    return el("time", { datetime: iso, text: iso.slice(0, 19).replace("T", " ") });
  }

  function status(value) {
    return el("span", { class: "status status-" + value, text: value });
  }

  function seconds(from, to) {
    if (!from) return null;
    const end = to ? Date.parse(to) : Date.now();
    return Math.max(0, (end - Date.parse(from)) / 1000);
  }

  function duration(value) {
    if (value === null) return "–";
    if (value < 1) return Math.round(value * 1000) + " ms";
    if (value < 120) return value.toFixed(2) + " s";
    return Math.floor(value / 60) + " min " + Math.round(value % 60) + " s";
  }

  function json(value) {
    return value === null || value === undefined ? "–" : JSON.stringify(value, null, 2);
  }

  // Calls `tick` every `interval` ms (after each call completes) until it returns false.
  function poll(tick, interval = 2000) {
    let timer = null;
    let stopped = false;
    async function run() {
      let again = true;
      try {
        again = (await tick()) !== false;
      } catch (error) {
        console.warn("refresh failed", error);
      }
      if (again && !stopped) timer = setTimeout(run, interval);
    }
    timer = setTimeout(run, interval);
    return {
      stop() {
        stopped = true;
        clearTimeout(timer);
      },
    };
  }

  function stamp() {
    return new Date().toISOString().slice(11, 19) + " UTC";
  }

  return { FINAL, pageData, api, el, when, status, seconds, duration, json, poll, stamp, toLogin };
})();
